"""Metrics: per-step records to ``metrics.jsonl`` and (optionally) Weights & Biases; FLOPs that were computed.

MFU counts the work a step really does (see docs/BENCHMARKS.md): per real token, 2 FLOPs per weight forward and
2 more backward for the activations' gradient, plus 2 for the weight's own gradient only when it is trained
(6N trained, 4N frozen); the LM head only on labelled tokens, as the chunked loss projects only those; causal
attention from the sum of squared sample lengths. The embedding lookup costs nothing; recomputation is not counted.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.grids import DataError
from ..runtime.logs import note

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one training step as ``per_token * tokens + per_label * labels + per_square * sum(L_i^2)``."""

    per_token: float
    per_label: float
    per_square: float

    def step(self, tokens: int, labels: int, sum_sq_lengths: int) -> float:
        return self.per_token * tokens + self.per_label * labels + self.per_square * sum_sq_lengths

    @classmethod
    def of(cls, packed: nn.Module) -> "FlopModel":
        lm = packed.causal_lm
        head = lm.get_output_embeddings()
        head_weight = head.get_base_layer().weight if hasattr(head, "get_base_layer") else head.weight
        embedding = lm.get_input_embeddings()
        embedding_weight = embedding.get_base_layer().weight if hasattr(embedding, "get_base_layer") else \
            embedding.weight
        head_prefix = next(n for n, m in lm.named_modules() if m is head) + "."
        embedding_prefix = next(n for n, m in lm.named_modules() if m is embedding) + "."
        per_token = per_label = 0.0
        for name, p in lm.named_parameters():
            if p is head_weight or p is embedding_weight or p.dim() < 2 or name.startswith(embedding_prefix):
                continue  # lookups (and the small LoRA on them) cost next to nothing
            if name.startswith(head_prefix):
                per_label += (6.0 if p.requires_grad else 4.0) * p.numel()
            else:
                per_token += (6.0 if p.requires_grad else 4.0) * p.numel()
        per_label += (6.0 if head_weight.requires_grad else 4.0) * head_weight.numel()
        cfg = lm.config
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_square = 6.0 * cfg.num_hidden_layers * heads * head_dim  # causal: half of 2 matmuls x (fwd + 2 bwd)
        return cls(per_token, per_label, per_square)


def json_safe(value):
    """``value`` with every NaN or infinite float as null: strict JSON (bare ``NaN`` is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class MetricsLogger:
    """Rank 0 appends one JSON line per logged step; on resume, rows past the checkpoint's step are dropped first
    (those steps are redone), so ``metrics.jsonl`` never holds a step twice."""

    def __init__(self, output_dir: Path, enabled: bool, use_wandb: bool, project: str, config: dict,
                 resume_step: int | None):
        self.enabled = enabled
        self.wandb = None
        self.file = None
        if not enabled:
            return
        path = output_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for n, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if n == len(lines):  # the last line, cut short by a killed run: that step is redone anyway
                        note(f"resume: {path}: dropping a damaged last line {n} ({e.msg})")
                        break
                    raise DataError(f"{path}: line {n} is not JSON ({e.msg}); remove that line to resume") from None
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        if use_wandb:
            import wandb

            mode = "online" if (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()) else "offline"
            self.wandb = wandb.init(project=project, config=config, dir=str(output_dir), mode=mode,
                                    resume="allow" if resume_step is not None else None,
                                    settings=wandb.Settings(silent=True))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(json_safe(record)) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()
