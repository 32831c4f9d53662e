"""Checkpoints: written to ``step-N.tmp`` and renamed when complete, the last K kept, the newest resumable.

A checkpoint holds the DeepSpeed state (module, optimizer), the model in Hugging Face form (PEFT adapter or full
model) with the tokenizer, the run config, and per rank the data-stream position and the RNG states.
"""
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_hf(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """The adapter (PEFT format) or full model, and the tokenizer, loadable with ``from_pretrained``."""
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def save_checkpoint(engine, model: torch.nn.Module, tokenizer, output_dir: Path, step: int, rank: int,
                    trainer_state: dict, data_state: dict, config_payload: dict, keep: int) -> Path:
    final = output_dir / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
    (tmp / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))
    torch.save(rng_state(), tmp / f"rng_state_rank{rank}.pt")
    if rank == 0:
        save_hf(model, tokenizer, tmp / "model")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        (tmp / "config.json").write_text(json.dumps(config_payload, indent=2))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(engine, checkpoint: Path, rank: int) -> tuple[dict, dict]:
    """Restore engine and RNG states; returns (trainer state, this rank's data state)."""
    engine.load_checkpoint(str(checkpoint), tag="deepspeed")
    data_file = checkpoint / f"data_state_rank{rank}.json"
    if not data_file.exists():
        raise ValueError(f"{checkpoint}: no data state for rank {rank}; resume with the world size it was saved with")
    set_rng_state(torch.load(checkpoint / f"rng_state_rank{rank}.pt", weights_only=False))
    return json.loads((checkpoint / "trainer_state.json").read_text()), json.loads(data_file.read_text())
