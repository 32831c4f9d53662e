"""Every command's config, composed of parts: each part is a dataclass of options declared once in its wing's
``options.py`` (or here, for the options one command alone has). A part may take a command's own defaults
(``part(Optimisation, max_steps=32)``); no config inherits another's fields. The command line and ``--config`` files
are generated from these (``flags``)."""
from dataclasses import dataclass

from ..data.options import Augmentation, DataOptions, PackingConfig, Sources, SyntheticConfig, TaskSet
from ..runtime.options import HostOptions, RunOptions, option, part
from ..sandbox.options import SandboxOptions
from ..solving.options import EvalTasks, Sampling, SolveOptions
from ..training.options import (
    EngineOptions,
    GlobalBatch,
    LoraOptions,
    ModelOptions,
    Optimisation,
    PackedOptions,
    Schedule,
    Validation,
    WandbOptions,
)


@dataclass
class TrainConfig:
    """``arc25-fast train`` (and ``train_ds.py``)."""

    run: RunOptions = part(RunOptions, output_dir="runs/default")
    host: HostOptions = part(HostOptions)
    model: ModelOptions = part(ModelOptions)
    packed: PackedOptions = part(PackedOptions)
    lora: LoraOptions = part(LoraOptions)
    engine: EngineOptions = part(EngineOptions)
    optim: Optimisation = part(Optimisation)
    batch: GlobalBatch = part(GlobalBatch)
    schedule: Schedule = part(Schedule)
    validation: Validation = part(Validation)
    eval_tasks: EvalTasks = part(EvalTasks)
    sandbox: SandboxOptions = part(SandboxOptions, workers=2)
    wandb: WandbOptions = part(WandbOptions)
    data: DataOptions = part(DataOptions)
    sources: Sources = part(Sources)
    augmentation: Augmentation = part(Augmentation)
    synthetic: SyntheticConfig = part(SyntheticConfig)
    packing: PackingConfig = part(PackingConfig)


@dataclass(frozen=True)
class TTTOptions:
    """One adapter per task, or one for all."""

    shared: bool = option(False, "Train one adapter over all tasks instead of one per task (one process).")


@dataclass
class TTTConfig:
    """``arc25-fast ttt``."""

    run: RunOptions = part(RunOptions, output_dir="runs/ttt")
    host: HostOptions = part(HostOptions)
    tasks: TaskSet = part(TaskSet)
    ttt: TTTOptions = part(TTTOptions)
    model: ModelOptions = part(ModelOptions)
    packed: PackedOptions = part(PackedOptions)
    lora: LoraOptions = part(LoraOptions)
    engine: EngineOptions = part(EngineOptions)
    optim: Optimisation = part(Optimisation, max_steps=32, warmup_steps=2)
    data: DataOptions = part(DataOptions)
    augmentation: Augmentation = part(Augmentation)
    synthetic: SyntheticConfig = part(SyntheticConfig)
    packing: PackingConfig = part(PackingConfig)


@dataclass(frozen=True)
class SearchOptions:
    """The rounds of a task: how many, what each learns from."""

    rounds: int = option(2, "Rounds per task: sample --samples programs, run them, and (but after the last round) "
                         "fine-tune the task's adapter on their hindsight tasks.", min=1)
    ttt_steps: int = option(0, "Test-time training steps on the task's demo pairs (leave-one-out, as ttt) before its "
                            "first round (0: none).", min=0)
    learn: bool = option(True, "Fine-tune between rounds on their hindsight tasks (--no-learn: rounds only search; "
                         "each still draws new programs and goes on from the best partial program of every round "
                         "before; docs/SEARCH.md measures what learning adds).")
    hindsight_per_task: int = option(16, "Most hindsight tasks a task learns from: one per distinct set of outputs "
                                     "over all its rounds so far, chosen by --hindsight-select.", min=1)
    hindsight_select: str = option("best-and-worst", "Which hindsight tasks a round learns from, by pixel accuracy "
                                   "on the demo outputs: half the best and half the worst (SOAR's and ironbar's "
                                   "choice), or the best only.", choices=("best-and-worst", "best"))
    stop_when_solved: bool = option(False, "End a task after the first round that has a program right on every "
                                    "demo pair: no learning or sampling after it (its answers rank that program "
                                    "first either way).")
    demo_weight: float = option(0.0, "Weight of the task's own demo pairs (leave-one-out output tasks) in each "
                                "learning phase, beside its hindsight tasks at weight 1 (0: hindsight only).", min=0.0)
    fresh_programs: bool = option(True, "No prompt of a task samples a program it drew before, in an earlier round "
                                  "or rest step: each samples from the model's distribution with the mass of its "
                                  "earlier programs (scored under the weights as they are now) taken out, sampling "
                                  "without replacement across rounds (docs/SEARCH.md; --no-fresh-programs: sample "
                                  "each time as if nothing had been drawn).")


@dataclass
class SearchConfig:
    """``arc25-fast search-and-learn``."""

    run: RunOptions = part(RunOptions, output_dir="runs/search")
    host: HostOptions = part(HostOptions)
    tasks: TaskSet = part(TaskSet)
    search: SearchOptions = part(SearchOptions)
    sampling: Sampling = part(Sampling)
    sandbox: SandboxOptions = part(SandboxOptions)
    model: ModelOptions = part(ModelOptions)
    packed: PackedOptions = part(PackedOptions)
    lora: LoraOptions = part(LoraOptions)
    engine: EngineOptions = part(EngineOptions)
    optim: Optimisation = part(Optimisation, max_steps=16, warmup_steps=2)
    wandb: WandbOptions = part(WandbOptions)
    data: DataOptions = part(DataOptions)
    augmentation: Augmentation = part(Augmentation)
    synthetic: SyntheticConfig = part(SyntheticConfig)
    packing: PackingConfig = part(PackingConfig)


@dataclass(frozen=True)
class EvalOptions:
    """Where evaluate's answers come from and where its hindsight lines go."""

    ttt_dir: str | None = option(None, "An arc25-fast ttt output directory: each task uses its own adapter there.")
    backend: str = option("auto", "Generation: auto (vLLM when installed and on GPU), vllm or hf.",
                          choices=("auto", "vllm", "hf"))
    her_out: str | None = option(None, "Append every executed program with the outputs it really produced on the "
                                 "task's inputs to this HER JSONL file (trains with --task-source her:FILE).")
    replay: str | None = option(None, "Answers from an earlier run's predictions.jsonl instead of a model: its "
                                "samples are run and scored again (--prompt-kind code, or output without --vote).")


@dataclass
class EvalConfig:
    """``arc25-fast evaluate``."""

    run: RunOptions = part(RunOptions, output_dir="runs/eval")
    host: HostOptions = part(HostOptions)
    tasks: TaskSet = part(TaskSet)
    model: ModelOptions = part(ModelOptions, name="")
    evaluation: EvalOptions = part(EvalOptions)
    solve: SolveOptions = part(SolveOptions)
    sampling: Sampling = part(Sampling)
    sandbox: SandboxOptions = part(SandboxOptions)
    data: DataOptions = part(DataOptions)
    augmentation: Augmentation = part(Augmentation)
    synthetic: SyntheticConfig = part(SyntheticConfig)


@dataclass
class ProfileConfig:
    """The training parts a speed profile builds its model and engine from (token budgets come from --budgets)."""

    host: HostOptions = part(HostOptions)
    model: ModelOptions = part(ModelOptions)
    packed: PackedOptions = part(PackedOptions)
    lora: LoraOptions = part(LoraOptions)
    engine: EngineOptions = part(EngineOptions)
    optim: Optimisation = part(Optimisation)
    data: DataOptions = part(DataOptions)
    sources: Sources = part(Sources)
    augmentation: Augmentation = part(Augmentation)
    synthetic: SyntheticConfig = part(SyntheticConfig)
    packing: PackingConfig = part(PackingConfig)


@dataclass
class DataConfig:
    """The config of the commands that look at the data alone (show-sample, profile-sampling-speed)."""

    data: DataOptions = part(DataOptions)
    sources: Sources = part(Sources)
    augmentation: Augmentation = part(Augmentation)
    synthetic: SyntheticConfig = part(SyntheticConfig)
    packing: PackingConfig = part(PackingConfig)
