"""Metrics: per-step records to a progress bar, ``metrics.jsonl`` and (optionally) Weights & Biases."""
import json
import os
from pathlib import Path

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def training_flops(n_params: int, n_layers: int, hidden: int, tokens: int, sum_sq_lengths: int) -> float:
    """Forward + backward FLOPs: 6 per parameter per token, plus causal attention within each sample."""
    return 6.0 * n_params * tokens + 6.0 * n_layers * hidden * sum_sq_lengths


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, use_wandb: bool, project: str, config: dict, resume: bool):
        self.enabled = enabled
        self.wandb = None
        self.file = None
        if not enabled:
            return
        self.file = open(output_dir / "metrics.jsonl", "a" if resume else "w")
        if use_wandb:
            import wandb

            mode = "online" if (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()) else "offline"
            self.wandb = wandb.init(project=project, config=config, dir=str(output_dir), mode=mode,
                                    resume="allow" if resume else None, settings=wandb.Settings(silent=True))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
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
