"""Scoring sampled answers of ARC tasks: parse, rank, pass@k, ARC Prize scores, Kaggle submissions, HER lines.

Ranking rule (documented in the README): candidates are grouped by the test output(s) they give; groups are ranked
by (train-correct first, then demo pairs solved, then the augmentation score where candidates were re-scored
(``--score-augmentations``: summed log-probability, higher first), then group size (votes), then the index of their
first sample).
Attempt i of a task is group i. ``pass@k``: one of the first k groups gives every test output right; ``pass@K``
(all samples): any sample does. The ARC Prize score of a task is the share of its test outputs right within two
attempts, each test output ranked on its own.

Code-from-examples: a program is *train-correct* when it reproduces every demo output. Output-from-examples: every
parsed grid is a candidate (it has no demo pairs to check); with voting, predictions made under augmentations are
mapped back first. Malformed text is a parse error, never a crash.
"""
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.grid_formats import GridFormat
from ..data.grids import MAX_SIDE, dihedral
from ..data.tasks import Task
from ..runtime.files import write_atomic

INVERSE_DIHEDRAL = {0: 0, 1: 3, 2: 2, 3: 1, 4: 4, 5: 5, 6: 6, 7: 7}


def parse_grid(text: str, fmt: GridFormat) -> np.ndarray | None:
    """The grid in ``text`` as rendered by ``fmt`` (the model's answer), or None when it is malformed."""
    body = text.strip()
    if fmt.prefix.strip():
        if not body.startswith(fmt.prefix.strip()):
            return None
        body = body[len(fmt.prefix.strip()):].lstrip(" ")
    if fmt.suffix.strip():
        if not body.endswith(fmt.suffix.strip()):
            return None
        body = body[:len(body) - len(fmt.suffix.strip())]
    body = body.strip("\n")
    height = width = None
    if fmt.shape_header:
        header, _, body = body.partition(fmt.header_end)
        m = re.fullmatch(rf"(\d+){re.escape(fmt.hw_sep)}(\d+)", header.strip())
        if not m:
            return None
        height, width = int(m.group(1)), int(m.group(2))
    rows = []
    for i, line in enumerate(body.split(fmt.row_sep), start=1):
        if fmt.row_numbers:
            number, sep, line = line.partition(fmt.rownum_end)
            if not sep or number != str(i):
                return None
        cells = line.split(fmt.cell_sep) if fmt.cell_sep else list(line)
        if not cells or any(len(c) != 1 or not c.isdigit() for c in cells):
            return None
        rows.append([int(c) for c in cells])
    if not rows or not 1 <= len(rows) <= MAX_SIDE or any(len(r) != len(rows[0]) for r in rows):
        return None
    if not 1 <= len(rows[0]) <= MAX_SIDE or (height is not None and (height, width) != (len(rows), len(rows[0]))):
        return None
    return np.array(rows, dtype=np.uint8)


def extract_code(text: str) -> str | None:
    """The program in a code-from-examples answer: inside its ```python fence, or up to a closing fence."""
    start = text.find("```python\n")
    if start >= 0:
        code = text[start + len("```python\n"):].split("\n```")[0]
    else:
        code = text.split("```")[0]
    return code if "def task" in code else None


def inverse_transform(grid: np.ndarray, k: int, color_map: np.ndarray | None) -> np.ndarray:
    """Undo ``dihedral(grid, k)`` followed by a colour permutation ``color_map``."""
    if color_map is not None:
        inverse = np.argsort(color_map).astype(np.uint8)
        grid = inverse[grid]
    return np.ascontiguousarray(dihedral(grid, INVERSE_DIHEDRAL[k]))


@dataclass
class Candidate:
    """One sample's answer to a task: its test output(s), how many demo pairs it solves (code) and its index."""

    test_outputs: tuple[np.ndarray | None, ...]
    demos_solved: int = 0
    demos_total: int = 0
    index: int = 0
    code: str | None = None
    score: float | None = None  # summed log-probability under augmented views (--score-augmentations)

    @property
    def train_correct(self) -> bool:
        return self.demos_total > 0 and self.demos_solved == self.demos_total


@dataclass
class Ranked:
    """A group of candidates with the same test outputs."""

    test_outputs: tuple[np.ndarray | None, ...]
    votes: int
    train_correct: bool
    demos_solved: int
    first: int
    codes: list[str] = field(default_factory=list)
    score: float | None = None


def _key(outputs: Sequence[np.ndarray | None]) -> tuple:
    return tuple(None if o is None else (o.shape, o.tobytes()) for o in outputs)


def rank(candidates: list[Candidate]) -> list[Ranked]:
    """Groups of candidates with valid test outputs, best first (see the module docstring)."""
    groups: dict[tuple, Ranked] = {}
    for c in candidates:
        if any(o is None for o in c.test_outputs):
            continue
        key = _key(c.test_outputs)
        g = groups.get(key)
        if g is None:
            groups[key] = g = Ranked(c.test_outputs, 0, c.train_correct, c.demos_solved, c.index, score=c.score)
        g.votes += 1
        g.train_correct |= c.train_correct
        g.demos_solved = max(g.demos_solved, c.demos_solved)
        if c.code is not None:
            g.codes.append(c.code)
    scored = any(g.score is not None for g in groups.values())
    return sorted(groups.values(), key=lambda g: (not g.train_correct, -g.demos_solved,
                                                  -(g.score if scored and g.score is not None else -math.inf),
                                                  -g.votes, g.first))


def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool((a == b).all())


def score_task(task: Task, candidates: list[Candidate], ks: Sequence[int] = (1, 2)) -> dict:
    """pass@k for each k, pass@K (any sample), the ARC Prize score (two attempts per test output), and the attempts.

    Tasks whose test outputs are unknown get attempts but no scores.
    """
    ranked = rank(candidates)
    truths = [o for _, o in task.test]
    known = all(t is not None for t in truths)
    out = {"candidates": len(candidates), "groups": len(ranked),
           "train_correct": sum(c.train_correct for c in candidates)}
    per_test = []  # each test output ranked on its own, for the two attempts
    for i in range(len(truths)):
        single = rank([Candidate((c.test_outputs[i],), c.demos_solved, c.demos_total, c.index, score=c.score)
                       for c in candidates])
        per_test.append([g.test_outputs[0] for g in single[:2]])
    out["attempts"] = per_test
    if known:
        right = [all(same(o, t) for o, t in zip(g.test_outputs, truths)) for g in ranked]
        for k in ks:
            out[f"pass@{k}"] = float(any(right[:k]))
        out["pass@all"] = float(any(all(same(o, t) for o, t in zip(c.test_outputs, truths)) for c in candidates))
        out["arc_score"] = float(np.mean([any(same(a, t) for a in attempts) for attempts, t in zip(per_test, truths)]))
    return out


FALLBACK = [[0]]  # the grid submitted for an attempt that has no answer (none produced, a failed task)


def submission_entry(task: Task, attempts: list[list[np.ndarray]]) -> list[dict]:
    """Kaggle format: one {"attempt_1": grid, "attempt_2": grid} per test input; a missing attempt is ``FALLBACK``."""
    entry = []
    for i in range(len(task.test)):
        grids = [a.tolist() for a in (attempts[i] if i < len(attempts) else [])]
        grids += [FALLBACK] * (2 - len(grids))
        entry.append({"attempt_1": grids[0], "attempt_2": grids[1]})
    return entry


def her_line(task: Task, code: str, outputs: list[np.ndarray]) -> dict:
    """A hindsight-relabelled task: every input of the task and what the program really produced on it."""
    inputs = [i for i, _ in task.train] + [i for i, _ in task.test]
    return {"inputs": [g.tolist() for g in inputs], "outputs": [o.tolist() for o in outputs], "code": code,
            "task_id": task.task_id}


def write_submission(out: Path, tasks: list[Task], rows: dict[str, dict]) -> None:
    """Kaggle's submission.json for every task (``scoring.FALLBACK`` where a task has no row yet), written whole and
    then renamed: never a half-written file. ``rows`` need only ``attempts`` (per test input, ranked grids as
    lists)."""
    submission = {}
    for task in sorted(tasks, key=lambda t: t.task_id):
        attempts = rows[task.task_id]["attempts"] if task.task_id in rows else []
        submission[task.task_id] = submission_entry(task, [[np.array(a, dtype=np.uint8) for a in per_test]
                                                           for per_test in attempts])
    write_atomic(out / "submission.json", json.dumps(submission))
