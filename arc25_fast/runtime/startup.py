"""The one start-up every command goes through, in this order: rank, world and device; the command's own checks of
its input (bad input fails here, before anything is written or printed); the output directory; logging; threads."""
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import barrier, init_distributed, init_private
from .logs import close_log_files, setup_logging
from .options import ConfigError, HostOptions, RunOptions
from .task_queue import wait_for_rank_zero
from .threads import set_threads

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "model", "adapter", "base_model", "train.log",
               "summary.json", "wandb", "ttt.log", "ttt_summary.json", "evaluate.log", "evaluate_summary.json",
               "predictions.jsonl", "submission.json", "queue", "search.log", "search_summary.json",
               "hindsight.jsonl")
RUN_OUTPUT_PREFIXES = ("rank", "train_rank", "ttt_rank", "evaluate_rank", "predictions_rank", "attempts_rank",
                       "timing_rank")
RUN_MARKERS = ("config.json", "checkpoints", "metrics.jsonl", "ttt_summary.json", "evaluate_summary.json",
               "search_summary.json")


@dataclass
class Started:
    """What the start-up found: this rank, the world, the device, the output directory and the checks' result."""

    rank: int
    world: int
    device: torch.device
    output_dir: Path | None = None
    checked: Any = None
    checked_in_dir: Any = None
    threads: int = 0


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_MARKERS)


def remove_run(output_dir: Path) -> None:
    """Remove a previous run's outputs (only files this project writes)."""
    for entry in output_dir.iterdir():
        task_output = entry.is_dir() and any((entry / f).exists() for f in ("task.json", "rounds.jsonl")) \
            or entry.name.endswith(".tmp")
        if entry.name in RUN_OUTPUTS or entry.name.startswith(RUN_OUTPUT_PREFIXES) or task_output:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def check_output_dir(run: RunOptions, rank: int) -> None:
    """The output directory exists and is writable; another run there is refused, resumed, or (rank 0) removed."""
    out = Path(run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {out}: not writable ({e.strerror})") from None
    if holds_run(out) and not run.resume:
        if not run.overwrite:
            raise ConfigError(f"--output-dir {out} holds another run; pass --resume to continue it, --overwrite to "
                              "start again there, or choose another directory")
        if rank == 0:
            close_log_files()
            remove_run(out)


def _rank_world_device(group: str, timeout_s: float) -> tuple[int, int, torch.device]:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if group == "private":
        return init_private(timeout_s)
    if group == "launcher":
        rank, world, local_rank = init_distributed(device_type, timeout_s)
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def start(name: str, host: HostOptions, run: RunOptions | None = None, group: str = "none",
          checks: Callable[[Started], Any] | None = None, checks_in_dir: Callable[[Started], Any] | None = None,
          data_workers: int = 0, log_dir: Path | None = None) -> Started:
    """Start a command's process.

    ``group``: ``launcher`` joins the launcher's process group (ranks train together), ``private`` makes a group of
    this process alone (ranks take tasks apart), ``none`` makes none. ``checks`` (given the rank, world and device)
    checks the command's input and returns what it loaded (``Started.checked``). Then the output directory is
    prepared (rank 0 first; the others wait) and ``checks_in_dir`` run (``Started.checked_in_dir``: e.g. resume).
    Last, ``<name>.log`` is opened there (or in ``log_dir`` for a command without one) and this rank's torch
    threads are set: no note is printed before every check has passed."""
    rank, world, device = _rank_world_device(group, host.collective_timeout)
    started = Started(rank, world, device, log_dir)
    if checks is not None:
        started.checked = checks(started)
    if run is not None:
        started.output_dir = Path(run.output_dir)
        if group == "launcher":
            check_output_dir(run, rank)
            barrier("the checks of the output directory")
        else:
            wait_for_rank_zero(lambda: check_output_dir(run, rank), name)
        if checks_in_dir is not None:
            started.checked_in_dir = checks_in_dir(started)
    setup_logging(started.output_dir, host.verbose, rank, name=name)
    started.threads = set_threads(host.threads, data_workers)
    return started
