"""The training loop: DeepSpeed engine, packed micro-batches, loss normalised over the global batch.

Loss normalisation: each micro-batch returns the *sum* of its token losses. The optimizer step must see the mean
over every labelled token of the global batch (all micro-batches of all ranks). DeepSpeed divides the loss by
``gradient_accumulation_steps`` unless told not to (``scale_wrt_gas=False``), and averages gradients over ranks. So
the backward pass uses ``loss_sum * world / n_labels_global``, where ``n_labels_global`` (the labelled tokens over
all micro-batches and ranks, known on the host from the data) is all-reduced before the backward passes, and
DeepSpeed's data-parallel gradient average divides by ``world`` again. So the step does not depend on how the
samples were packed, split into micro-batches or spread over ranks.

Host syncs: one all-reduce of host counts before a step and one of the device-side loss statistics after it;
nothing reads a device value back per micro-batch.
"""
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_newest, save_checkpoint, save_hf
from .config import ConfigError, TrainConfig, package_versions, save_run_config
from .engine import CollectiveTimeout, barrier, build_engine, init_distributed
from .faults import EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteSteps, RunStopped, StopSignals
from .logs import close_log_files, note, set_progress_bar, setup_logging
from .metrics import FlopModel, MetricsLogger, json_safe, peak_flops
from .model import resolve_dtype
from .pipeline import build_pipeline, packing_config
from .preflight import preflight
from .stream import DataPosition, Loader, PackedDataset, PackedStream
from .threads import set_threads
from .trainer import build_model, learning_rate, optimizer_step, weights_finite
from .validation import evaluate_loss, validation_batches


def resolve_grad_accum(cfg: TrainConfig, world: int, mix, encoder) -> int:
    """Micro-batches per rank and step, from --grad-accum or a global batch size in tokens or samples."""
    per_micro = cfg.data.max_tokens * world
    if cfg.global_batch_tokens:
        return max(1, round(cfg.global_batch_tokens / per_micro))
    if cfg.global_batch_samples:
        probe = PackedStream(mix, encoder, packing_config(cfg.data), cfg.data.seed, rank=0, stream=1 << 21)
        it = iter(probe)
        for _ in range(16):
            next(it)
        per_micro = probe.stats.samples / probe.stats.micro_batches * world
        return max(1, round(cfg.global_batch_samples / per_micro))
    return cfg.grad_accum


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step records (also written to ``metrics.jsonl`` on rank 0).

    Raises ``RunStopped`` (with an exit code) when a signal or non-finite steps stop the run early. A start that
    fails before the first step leaves no output directory behind if this run created it.
    """
    output_dir = Path(cfg.output_dir)
    created = not output_dir.exists()
    try:
        return _train(cfg)
    except Exception:
        if created and int(os.environ.get("RANK", 0)) == 0 and not (output_dir / "metrics.jsonl").exists():
            close_log_files()
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def _train(cfg: TrainConfig) -> list[dict]:
    started = time.perf_counter()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = init_distributed(device_type, cfg.collective_timeout)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    checks = preflight(cfg, device, world, rank)  # bad options fail here, before anything else is printed
    barrier("the checks before training")
    output_dir = Path(cfg.output_dir)
    setup_logging(output_dir, cfg.verbose, rank)

    mix, encoder = build_pipeline(cfg.data)  # bad data and tokenizers fail here, before the thread note
    tokenizer = encoder.tokenizer
    threads = set_threads(cfg.threads, cfg.num_workers)
    model, packed, backend = build_model(cfg, len(tokenizer), device, output_dir, rank)
    grad_accum = resolve_grad_accum(cfg, world, mix, encoder)
    engine, ds_config = build_engine(cfg, packed, device, grad_accum, world)
    payload = {"config": asdict(cfg), "resolved": {"grad_accum": grad_accum, "world_size": world,
                                                   "attention": backend, "torch_threads": threads,
                                                   "dtype": str(resolve_dtype(cfg.dtype, device)),
                                                   "encoder": type(encoder).__name__, "deepspeed": ds_config},
               "versions": package_versions()}
    if rank == 0:
        save_run_config(cfg, output_dir, {k: v for k, v in payload.items() if k != "config"})

    step, data_resume = 0, None
    if checks.checkpoints:
        checkpoint, trainer_state, data_resume, skipped = load_newest(engine, checks.checkpoints, rank, device)
        for line in skipped:
            note(f"resume: skipping {line}", rank)
        if checkpoint is None:
            raise ConfigError(f"--resume: none of the checkpoints in {output_dir / 'checkpoints'} could be loaded; "
                              "use --overwrite to start again")
        step = trainer_state["step"]
        note(f"resumed from {checkpoint} at step {step}", rank)

    dataset = PackedDataset(mix, encoder, packing_config(cfg.data), cfg.data.seed, rank, cfg.num_workers,
                            data_resume)
    position = DataPosition(dataset.num_streams, **({k: data_resume[k] for k in ("consumed", "streams")}
                                                    if data_resume else {}))
    val = []
    if cfg.eval_every:
        val, val_dropped = validation_batches(cfg.data, cfg.val_source, cfg.val_samples, mix, encoder)
        val = val[rank::world]
        if val_dropped:
            note(f"validation: {val_dropped} samples longer than max_tokens={cfg.data.max_tokens} left out", rank)
    task_eval = None
    if cfg.eval_tasks and cfg.eval_tasks_every:
        from .generation_eval import GenerationEval

        task_eval = GenerationEval(cfg, mix, encoder, rank, world)
    logger = MetricsLogger(output_dir, rank == 0, cfg.wandb, cfg.wandb_project, payload,
                           step if checks.checkpoints else None)
    flops, peak = FlopModel.of(packed), peak_flops(device)
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
        set_progress_bar(progress)

    records, last_val = [], {}
    if cfg.eval_every and step == 0:  # the starting point of the validation curve
        last_val = evaluate_loss(engine, val, device)
        logger.log({"step": 0, **last_val})
    batches, seen = Loader(dataset, cfg.num_workers), micro_batch_log(output_dir, rank, position.consumed)
    bad = NonFiniteSteps(cfg.max_bad_steps)
    saved_step, stop = step if checks.checkpoints else None, None
    try:
        with StopSignals() as signals:
            while step < cfg.max_steps:
                t_start = time.perf_counter()
                micro = [next(batches) for _ in range(grad_accum)]
                t_data = time.perf_counter() - t_start
                seen.writelines(hashlib.sha1(b["input_ids"].numpy().tobytes()).hexdigest()[:16] + "\n" for b in micro)
                seen.flush()
                try:
                    stats = optimizer_step(engine, micro, learning_rate(cfg, step), device, world, position,
                                           lambda: signals.requested)
                except RuntimeError as e:
                    if world > 1 and not isinstance(e, CollectiveTimeout) and is_collective_failure(e):
                        raise CollectiveTimeout(f"rank {rank}: a collective of step {step + 1} (gradient reduction or "
                                                f"the step's all-reduce) failed: a peer rank stalled or died "
                                                f"({str(e).strip().splitlines()[0][:200]})") from None
                    raise
                step += 1
                skipped = bad.record(stats["loss"], stats["grad_norm"])
                seconds = time.perf_counter() - t_start
                record = {"step": step, **{k: stats[k] for k in ("loss", "accuracy", "answer_loss", "lr", "grad_norm",
                                                                 "tokens", "samples", "padding_fraction")},
                          "tokens_per_s": stats["tokens"] / seconds, "samples_per_s": stats["samples"] / seconds,
                          "step_time_s": seconds, "data_wait_s": t_data, "skipped": skipped,
                          "skipped_steps": bad.total,
                          "peak_memory_gb": (torch.cuda.max_memory_allocated(device) if device_type == "cuda"
                                             else _rss_bytes()) / 2**30}
                if peak:
                    record["mfu"] = flops.step(stats["tokens"], stats["labels"], stats["sum_sq_lengths"]) / seconds \
                        / (peak * world)
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    last_val = evaluate_loss(engine, val, device)
                    record.update(last_val)
                if task_eval is not None and (step % cfg.eval_tasks_every == 0 or step == cfg.max_steps):
                    record.update(task_eval(packed, device))
                records.append(record)
                if step % cfg.log_every == 0 or "val_loss" in record or skipped:
                    logger.log(record)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "eval_pass@2",
                                                                          "tokens_per_s")
                                          if record.get(k) is not None})
                if skipped:
                    note(f"step {step}: non-finite loss {stats['loss']:.4g} or gradient norm {stats['grad_norm']:.4g}:"
                         f" step skipped ({bad.in_a_row} in a row, stop at {cfg.max_bad_steps})", rank)
                if bad.exhausted:
                    stop = "non-finite"
                    break
                if stats["stop"]:
                    stop = "preempted"
                    break
                if ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps) and not bad.in_a_row:
                    save_checkpoint(engine, model, tokenizer, output_dir, step, rank, {"step": step},
                                    position.state(), payload, cfg.keep_checkpoints)
                    saved_step = step
            signal_name = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
    finally:
        batches.close()
        seen.close()
        if task_eval is not None:
            task_eval.close()
        if progress is not None:
            progress.close()
            set_progress_bar(None)

    finite = weights_finite(packed)
    if stop == "preempted":
        if saved_step != step and finite:
            save_checkpoint(engine, model, tokenizer, output_dir, step, rank, {"step": step}, position.state(),
                            payload, cfg.keep_checkpoints)
            saved_step = step
        write_rank_summary(output_dir, rank, packed, position.consumed, "preempted", step)
        logger.close()
        raise RunStopped(f"stopped by {signal_name} after step {step}: "
                         + (f"checkpoint step-{saved_step:06d} written; continue with --resume" if saved_step is not None
                            else "no checkpoint (the weights are not finite)"), EXIT_PREEMPTED)
    if stop == "non-finite" or not finite:  # not finite alone: e.g. resumed from a damaged checkpoint with fewer
        write_rank_summary(output_dir, rank, packed, position.consumed, "non-finite", step)  # steps left than it takes
        logger.close()
        newest = f"checkpoint step-{saved_step:06d} is the last good one" if saved_step is not None else "no checkpoint"
        if stop == "non-finite":
            why = "" if finite else " The weights themselves are not finite (a damaged checkpoint?)."
            cause = (f"{bad.in_a_row} steps in a row had a non-finite loss or gradient norm (last: loss "
                     f"{stats['loss']:.4g}, grad norm {stats['grad_norm']:.4g}); nothing saved, {newest}.{why}")
        else:
            cause = f"the weights are not finite (a damaged checkpoint or a diverged step); nothing published, {newest}."
        raise RunStopped(f"stopped at step {step}: {cause} Lower --lr or check the data.", EXIT_NON_FINITE)
    write_rank_summary(output_dir, rank, packed, position.consumed, "done", step)
    if rank == 0:
        final = output_dir / ("adapter" if hasattr(model, "peft_config") else "model")
        save_hf(model, tokenizer, final)
        summary = run_summary(cfg, records, last_val, final, time.perf_counter() - started)
        (output_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
        note(summary["line"], rank)
    logger.close()
    barrier("the end of training")
    return records


def run_summary(cfg: TrainConfig, records: list[dict], last_val: dict, final: Path, seconds: float) -> dict:
    """Where everything is and how training went, as a dict and as the one line printed at the end."""
    out = Path(cfg.output_dir)
    tail = records[-10:]
    tokens, step_s = sum(r["tokens"] for r in records), sum(r["step_time_s"] for r in records)
    summary = {"steps": records[-1]["step"] if records else 0, "seconds": seconds,
               "final": str(final), "metrics": str(out / "metrics.jsonl"), "checkpoints": str(out / "checkpoints"),
               "train_loss": sum(r["loss"] for r in tail) / max(len(tail), 1),
               "tokens_per_s": tokens / step_s if step_s else 0.0, **last_val}
    kind = "adapter" if final.name == "adapter" else "model"
    val = (f", val loss {last_val['val_loss']:.3f} (answer accuracy {last_val['val_answer_accuracy']:.2f})"
           if "val_loss" in last_val else "")
    summary["line"] = (f"done: {summary['steps']} steps in {seconds / 60:.1f} min; {kind} -> {final}, metrics -> "
                       f"{summary['metrics']}, checkpoints -> {summary['checkpoints']}; train loss "
                       f"{summary['train_loss']:.3f} (last {len(tail)} steps){val}; {summary['tokens_per_s']:,.0f} "
                       "tokens/s")
    return summary


def micro_batch_log(output_dir: Path, rank: int, consumed: int):
    """Append-only ``rank{r}_micro_batches.txt``: a hash of each micro-batch this rank trained on, for audits.

    On resume the lines past the checkpoint (``consumed`` micro-batches) are dropped, as those steps are redone.
    """
    path = output_dir / f"rank{rank}_micro_batches.txt"
    kept = path.read_text().splitlines()[:consumed] if consumed and path.exists() else []
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def is_collective_failure(error: RuntimeError) -> bool:
    text = str(error).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))


def write_rank_summary(output_dir: Path, rank: int, packed: nn.Module, micro_batches: int, status: str,
                       step: int) -> None:
    """How this rank's run ended (done, preempted, non-finite), at which step, how many micro-batches it trained
    on and a hash of its trainable weights, for audits."""
    digest = hashlib.sha1()
    for name, p in packed.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    summary = {"rank": rank, "status": status, "step": step, "micro_batches": micro_batches,
               "trainable_weights_sha1": digest.hexdigest()}
    (output_dir / f"rank{rank}_summary.json").write_text(json.dumps(summary))


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
