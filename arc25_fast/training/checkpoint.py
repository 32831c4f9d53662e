"""Checkpoints: written to ``step-N.tmp``, sealed by a ``COMPLETE.json`` marker written last, then renamed.

A checkpoint holds the DeepSpeed state (module, optimizer), the model in Hugging Face form (PEFT adapter or full
model) with the tokenizer, the run config, and per rank the data-stream position and the RNG states. The marker
lists every file with its size, so resume can tell a complete checkpoint from a truncated or half-deleted one and
falls back to the newest valid checkpoint, saying which it skipped and why.
"""
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.distributed import all_reduce, barrier
from ..runtime.global_rng import rng_state, set_rng_state
from .model import sync_tied_head

STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """``step-N`` folders (complete or not), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why this checkpoint cannot be resumed from (no marker, a file missing or of the wrong size), or None."""
    marker = path / MARKER
    if not marker.exists():
        return "incomplete (no COMPLETE.json)"
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "damaged COMPLETE.json"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, expected {size}"
    return None


def checkpoint_info(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def valid_checkpoints(output_dir: Path) -> tuple[list[Path], list[str]]:
    """Resumable checkpoints, newest first, and a note for each newer one skipped."""
    valid, skipped = [], []
    for path in reversed(checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if problem:
            skipped.append(f"{path.name}: {problem}")
        else:
            valid.append(path)
    return valid, skipped


def save_hf(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """The adapter (PEFT format) or full model, and the tokenizer, loadable with ``from_pretrained``."""
    sync_tied_head(model)
    if hasattr(model, "peft_config"):  # the frozen vocabulary-sized base weights are not part of the adapter
        model.save_pretrained(str(directory), save_embedding_layers=False)
    else:
        model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def save_hf_replacing(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """``save_hf`` into ``directory.tmp``, then that in place of ``directory``: never a half-written adapter."""
    tmp = directory.with_name(directory.name + ".tmp")
    save_hf(model, tokenizer, tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def save_checkpoint(engine, model: torch.nn.Module, tokenizer, output_dir: Path, step: int, rank: int,
                    trainer_state: dict, data_state: dict, config_payload: dict, keep: int) -> Path:
    """Every rank writes its part into ``step-N.tmp``; rank 0 seals it with the marker, renames it, prunes old ones."""
    root = output_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        for stale in root.glob("step-*.tmp") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier(f"checkpoint step {step} (start)")
    engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
    (tmp / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))
    torch.save(rng_state(), tmp / f"rng_state_rank{rank}.pt")
    if rank == 0:
        save_hf(model, tokenizer, tmp / "model")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        (tmp / "config.json").write_text(json.dumps(config_payload, indent=2))
    barrier(f"checkpoint step {step} (files written)")
    if rank == 0:
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        marker = {"step": step, "world_size": dist.get_world_size(), **trainer_state, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        complete = [p for p in checkpoint_dirs(output_dir) if checkpoint_problem(p) is None]
        for old in complete[:-keep]:
            shutil.rmtree(old)
    barrier(f"checkpoint step {step} (sealed)")
    return final


def load_checkpoint(engine, checkpoint: Path, rank: int) -> tuple[dict, dict]:
    """Restore engine and RNG states; returns (trainer state, this rank's data state)."""
    engine.load_checkpoint(str(checkpoint), tag="deepspeed", load_module_strict=False)
    set_rng_state(torch.load(checkpoint / f"rng_state_rank{rank}.pt", weights_only=False))
    return (json.loads((checkpoint / "trainer_state.json").read_text()),
            json.loads((checkpoint / f"data_state_rank{rank}.json").read_text()))


def load_newest(engine, candidates: list[Path], rank: int, device: torch.device) -> tuple[Path | None, dict, dict,
                                                                                         list[str]]:
    """Load the newest candidate that every rank can load; returns it, its states and notes on those skipped."""
    notes = []
    for path in candidates:
        try:
            states = load_checkpoint(engine, path, rank)
            ok, problem = 1.0, ""
        except Exception as e:  # a damaged file of the right size: try the next one
            ok, problem, states = 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", None
        if all_reduce([ok], device, f"whether {path.name} loaded", dist.ReduceOp.MIN)[0] == 1.0:
            return path, states[0], states[1], notes
        notes.append(f"{path.name}: failed to load" + (f" ({problem})" if problem else " on another rank"))
    return None, {}, {}, notes
