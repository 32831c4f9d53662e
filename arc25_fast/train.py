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
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_newest, save_checkpoint, save_hf
from .config import ConfigError, TrainConfig, package_versions, save_run_config
from .engine import CollectiveTimeout, all_reduce, barrier, build_engine, init_distributed
from .faults import EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteSteps, RunStopped, StopSignals
from .kernels import attention
from .logs import note, set_progress_bar, setup_logging
from .metrics import FlopModel, MetricsLogger, peak_flops
from .model import PackedCausalLM, add_adapter, check_packed_model, is_random_init, load_base_model, resolve_dtype
from .pipeline import build_pipeline, packing_config
from .preflight import preflight
from .stream import DataPosition, Loader, PackedDataset, PackedStream
from .validation import evaluate_loss, model_inputs, validation_batches


def idle_cores(cpus: set[int], seconds: float = 0.25) -> float:
    """How much of the CPUs ``cpus`` other processes leave idle right now (sampled before this process starts
    working; per CPU, so that busy cores outside the set do not count)."""
    import psutil

    busy = psutil.cpu_percent(interval=seconds, percpu=True)
    return sum(1.0 - busy[c] / 100.0 for c in cpus if c < len(busy))


def set_threads(requested: int, num_workers: int) -> int:
    """torch threads of this rank: ``requested``, or OMP_NUM_THREADS when set, or this node's cores shared by its
    ranks, less one per data worker beyond the first (a worker mostly waits, but a second one competes), and less
    the cores other processes keep busy: a torch thread on a busy core makes every parallel region wait for it
    (measured: the main job is 1.8x slower with 2 threads than with 1 next to one busy process, 1.8x faster alone)."""
    if requested:
        threads = requested
    elif "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    else:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        cores = len(cpus)
        # with several local ranks the others are busy by design (and still starting): share the cores by division
        available = cores if local_ranks > 1 else min(cores, round(idle_cores(cpus)))
        threads = max(1, available // local_ranks - max(0, num_workers - 1))
        if available < cores:
            note(f"{cores - available} of {cores} cores are busy with other processes: {threads} torch thread(s) per "
                 "rank (--threads N to choose)")
    torch.set_num_threads(threads)
    return threads


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine or linear decay to 0 at ``max_steps`` (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


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


class StepTimer:
    """Seconds spent in forward, backward and optimizer (profiling only: it synchronises the device at each mark)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def optimizer_step(engine, micro: list[dict], lr: float, device: torch.device, world: int,
                   position: DataPosition | None = None, stop_requested: bool = False,
                   timer: StepTimer | None = None) -> dict:
    """One optimizer step over this rank's micro-batches; the loss is the mean over the global batch's labels.

    A non-finite micro-batch loss turns that micro-batch's gradient into NaN (on the device, no sync), so DeepSpeed's
    check of the global gradient norm skips the whole step on every rank: weights and optimizer state stay as they
    were. ``stop_requested`` (a signal on this rank) is reduced with the step's statistics, so all ranks agree.
    """
    lengths = [np.diff(b["cu_seqlens"].numpy()) for b in micro]
    local = [sum(b["n_labels"] for b in micro), sum(b["n_samples"] for b in micro),
             sum(int(x.sum()) for x in lengths), sum(b["input_ids"].numel() for b in micro),
             sum(int((x.astype(np.int64) ** 2).sum()) for x in lengths)]
    n_labels, n_samples, n_tokens, n_positions, sum_sq = all_reduce(local, device, "the step's token counts")
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = torch.zeros(7, dtype=torch.float64, device=device)  # loss, 5 stats, stop flag
    normaliser = world / n_labels
    if timer is not None:
        timer.start()
    for batch in micro:
        loss, stats = engine(**model_inputs(batch, device))
        if timer is not None:
            timer.mark("forward")
        poison = torch.where(torch.isfinite(loss), 1.0, float("nan"))
        engine.backward(loss * (poison * normaliser), scale_wrt_gas=False)
        if timer is not None:
            timer.mark("backward")
        engine.step()
        if timer is not None:
            timer.mark("optimizer")
        totals[0] += loss.detach().double()
        totals[1:6] += stats
        if position is not None:
            position.advance(batch)
    totals[6] = float(stop_requested)
    loss_sum, _, correct, answer_loss, answer_n, answer_correct, stop = all_reduce(totals, device, "the step's loss")
    grad_norm = engine.get_global_grad_norm()
    return {"loss": loss_sum / n_labels, "accuracy": correct / n_labels, "answer_loss": answer_loss / max(answer_n, 1),
            "lr": lr, "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "tokens": int(n_tokens),
            "samples": int(n_samples), "labels": int(n_labels), "padding_fraction": 1.0 - n_tokens / n_positions,
            "sum_sq_lengths": int(sum_sq), "stop": stop > 0}


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, output_dir: Path | None = None,
                rank: int = 0) -> tuple[nn.Module, PackedCausalLM, str]:
    """The (adapter-wrapped) model, its packed-loss wrapper on ``device``, and the attention backend used.

    The base model is checked against its own per-sample outputs before anything trains (``check_packed_model``).
    """
    dtype = resolve_dtype(cfg.dtype, device)
    backend = attention.choose_backend(cfg.attn, device)
    key = attention.register(backend)
    base = load_base_model(cfg.model, vocab_size, dtype, key, cfg.data.seed)
    if output_dir is not None and is_random_init(cfg.model):  # so the adapter's base model can be loaded again
        if rank == 0:
            base.save_pretrained(str(output_dir / "base_model"))
        base.name_or_path = base.config.name_or_path = str((output_dir / "base_model").resolve())
    base.to(device)
    check_packed_model(base, key)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = add_adapter(base, cfg)
    return model, PackedCausalLM(model, cfg.loss_chunk_tokens).to(device), backend


def weights_finite(packed: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in packed.parameters() if p.requires_grad)


def train(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step records (also written to ``metrics.jsonl`` on rank 0).

    Raises ``RunStopped`` (with an exit code) when a signal or non-finite steps stop the run early.
    """
    started = time.perf_counter()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = init_distributed(device_type, cfg.collective_timeout)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    threads = set_threads(cfg.threads, cfg.num_workers)
    checks = preflight(cfg, device, world, rank)
    barrier("the checks before training")
    output_dir = Path(cfg.output_dir)
    setup_logging(output_dir, cfg.verbose, rank)

    mix, encoder = build_pipeline(cfg.data)
    tokenizer = encoder.tokenizer
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
        from .evaluate import GenerationEval

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
                                           signals.requested)
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

    if stop == "preempted":
        finite = weights_finite(packed)
        if saved_step != step and finite:
            save_checkpoint(engine, model, tokenizer, output_dir, step, rank, {"step": step}, position.state(),
                            payload, cfg.keep_checkpoints)
            saved_step = step
        write_rank_summary(output_dir, rank, packed, position.consumed, "preempted", step)
        logger.close()
        raise RunStopped(f"stopped by {signal_name} after step {step}: "
                         + (f"checkpoint step-{saved_step:06d} written; continue with --resume" if saved_step is not None
                            else "no checkpoint (the weights are not finite)"), EXIT_PREEMPTED)
    if stop == "non-finite":
        write_rank_summary(output_dir, rank, packed, position.consumed, "non-finite", step)
        logger.close()
        why = "" if weights_finite(packed) else " The weights themselves are not finite (a damaged checkpoint?)."
        newest = f"checkpoint step-{saved_step:06d} is the last good one" if saved_step is not None else "no checkpoint"
        raise RunStopped(f"stopped at step {step}: {bad.in_a_row} steps in a row had a non-finite loss or gradient "
                         f"norm (last: loss {stats['loss']:.4g}, grad norm {stats['grad_norm']:.4g}); nothing saved, "
                         f"{newest}.{why} Lower --lr or check the data.", EXIT_NON_FINITE)

    write_rank_summary(output_dir, rank, packed, position.consumed, "done", step)
    if rank == 0:
        final = output_dir / ("adapter" if hasattr(model, "peft_config") else "model")
        save_hf(model, tokenizer, final)
        summary = run_summary(cfg, records, last_val, final, time.perf_counter() - started)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
