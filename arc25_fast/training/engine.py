"""The optimizer engine: DeepSpeed's (its config checked and completed) or ``LocalEngine`` for one process."""
import json
from pathlib import Path

import torch

from ..runtime.distributed import apply_collective_timeout
from ..runtime.extensions import build_op, extension_build_notes
from ..runtime.options import ConfigError
from .local_engine import LocalEngine
from .model import resolve_dtype
from .options import TrainingParts

DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"


def load_ds_config(cfg: TrainingParts, device: torch.device) -> tuple[Path, dict]:
    """The DeepSpeed config file and its contents; a malformed file or an unsupported ZeRO stage is refused."""
    default = DS_CONFIGS / ("zero2.json" if device.type == "cuda" else "cpu.json")
    path = Path(cfg.engine.ds_config) if cfg.engine.ds_config else default
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--ds-config {path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds-config {path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds-config {path}: expected a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ConfigError(f"--ds-config {path}: ZeRO stage {stage} is not supported: stages 1 and 2 keep whole weights "
                          "on every rank (checkpoints, adapters) and skip a step whose gradient is not finite")
    if ds.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ConfigError(f"--ds-config {path}: compute_grad_norm false would hide a non-finite gradient; remove it")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"--ds-config {path}: fp16 needs loss scaling, which this trainer does not do; use bf16")
    return path, ds


def deepspeed_config(cfg: TrainingParts, device: torch.device, dtype: torch.dtype, grad_accum: int, world: int) -> dict:
    _, ds = load_ds_config(cfg, device)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum,
              train_batch_size=grad_accum * world, gradient_clipping=cfg.optim.grad_clip)
    # a step whose global gradient norm is not finite is skipped (weights and optimizer state unchanged)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16, "check_grad_overflow": True}
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    return ds


def use_local_engine(cfg: TrainingParts, world: int, small_steps: bool) -> bool:
    """``--engine``: local on one process when asked, or under auto for commands that train in small steps."""
    if cfg.engine.kind == "local":
        if world > 1:
            raise ConfigError(f"--engine local trains one process; this run has {world} ranks (use deepspeed)")
        return True
    return cfg.engine.kind == "auto" and small_steps and world == 1 and cfg.engine.ds_config is None


def build_engine(cfg: TrainingParts, packed: torch.nn.Module, device: torch.device, grad_accum: int, world: int,
                 small_steps: bool = False):
    """The optimizer engine and the config it records: ``LocalEngine`` (one process) or DeepSpeed's, whose
    optimizer is the config's (e.g. CPU Adam for offload) or torch's AdamW."""
    params = [p for p in packed.parameters() if p.requires_grad]
    if use_local_engine(cfg, world, small_steps):
        engine = LocalEngine(packed, params, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, grad_accum)
        return engine, {"engine": "local", "optimizer": "AdamW (fused, fp32 master weights)",
                        "gradient_accumulation_steps": grad_accum, "gradient_clipping": cfg.optim.grad_clip}
    import deepspeed

    ds_config = deepspeed_config(cfg, device, resolve_dtype(cfg.model.dtype, device), grad_accum, world)
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.op_builder import CPUAdamBuilder

        build_op(lambda: CPUAdamBuilder().load(verbose=False), "cpu_adam")
    with extension_build_notes():
        engine, _, _, _ = deepspeed.initialize(model=packed, model_parameters=params, optimizer=optimizer,
                                               config=ds_config)
    apply_collective_timeout(cfg.host.collective_timeout)
    return engine, ds_config
