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

import click
import torch
from torch import nn

from ..data.pipeline import build_pipeline
from ..data.stream import DataPosition, Loader, PackedDataset, PackedStream
from ..runtime.distributed import CollectiveTimeout, barrier
from ..runtime.faults import EXIT_NON_FINITE, EXIT_PREEMPTED, NonFiniteSteps, RunStopped, StopSignals
from ..runtime.files import package_versions, save_run_config, write_atomic
from ..runtime.logs import close_log_files, note, set_progress_bar
from ..runtime.options import ConfigError
from ..runtime.startup import start
from ..solving.train_eval import GenerationEval
from ..training.checkpoint import load_newest, save_checkpoint, save_hf
from ..training.engine import build_engine
from ..training.metrics import FlopModel, MetricsLogger, json_safe, peak_flops
from ..training.model import resolve_dtype
from ..training.preflight import check_run_dir, preflight
from ..training.trainer import build_model, learning_rate, optimizer_step, weights_finite
from ..training.validation import evaluate_loss, validation_batches
from .configs import TrainConfig
from .flags import command_config, config_options


@click.command()
@config_options(TrainConfig)
def train(config_file, **values):
    """Train on one process (same DeepSpeed engine as train_ds.py).

    Writes to --output-dir: checkpoints/, metrics.jsonl, config.json, train.log, summary.json and the final adapter/
    or model/."""
    run(command_config(TrainConfig, config_file, values))


def run(cfg: TrainConfig) -> list[dict]:
    """Run training; returns the per-step records (also written to ``metrics.jsonl`` on rank 0).

    Raises ``RunStopped`` (with an exit code) when a signal or non-finite steps stop the run early. A start that
    fails before the first step leaves no output directory behind if this run created it.
    """
    output_dir = Path(cfg.run.output_dir)
    created = not output_dir.exists()
    try:
        training = Training(cfg)
        training.setup()
        stop = training.loop()
        return training.finish(stop)
    except Exception:
        if created and int(os.environ.get("RANK", 0)) == 0 and not (output_dir / "metrics.jsonl").exists():
            close_log_files()
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def resolve_grad_accum(cfg: TrainConfig, world: int, mix, encoder) -> int:
    """Micro-batches per rank and step, from --grad-accum or a global batch size in tokens or samples."""
    per_micro = cfg.packing.max_tokens * world
    if cfg.batch.global_batch_tokens:
        return max(1, round(cfg.batch.global_batch_tokens / per_micro))
    if cfg.batch.global_batch_samples:
        probe = PackedStream(mix, encoder, cfg.packing, cfg.data.seed, rank=0, stream=1 << 21)
        it = iter(probe)
        for _ in range(16):
            next(it)
        per_micro = probe.stats.samples / probe.stats.micro_batches * world
        return max(1, round(cfg.batch.global_batch_samples / per_micro))
    return cfg.optim.grad_accum


class Training:
    """One training run: ``setup`` (start-up, checks, data, model, engine, resume), ``loop`` (the steps) and
    ``finish`` (the ending: a checkpoint and a stop status, or the final model and the summary)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.started = cfg, time.perf_counter()
        self.records, self.last_val, self.stats = [], {}, None

    def setup(self) -> None:
        cfg = self.cfg
        s = start("train", cfg.host, cfg.run, group="launcher", data_workers=cfg.batch.num_workers,
                  checks=lambda s: (preflight(cfg, s.device), build_pipeline(cfg)),
                  checks_in_dir=lambda s: check_run_dir(cfg, s.checked[0], s.device, s.world))
        (_, (mix, encoder)), checkpoints, device = s.checked, s.checked_in_dir, s.device
        self.rank, self.world, self.device, self.output_dir = s.rank, s.world, device, s.output_dir
        self.encoder, self.tokenizer = encoder, encoder.tokenizer
        self.model, self.packed, backend = build_model(cfg, len(self.tokenizer), device, s.output_dir, s.rank)
        self.grad_accum = resolve_grad_accum(cfg, s.world, mix, encoder)
        self.engine, ds_config = build_engine(cfg, self.packed, device, self.grad_accum, s.world)
        self.payload = {"config": asdict(cfg), "resolved": {
            "grad_accum": self.grad_accum, "world_size": s.world, "attention": backend, "torch_threads": s.threads,
            "dtype": str(resolve_dtype(cfg.model.dtype, device)), "encoder": type(encoder).__name__,
            "deepspeed": ds_config}, "versions": package_versions()}
        if s.rank == 0:
            save_run_config(cfg, s.output_dir, {k: v for k, v in self.payload.items() if k != "config"})
        self.step, data_resume = self.resume(checkpoints)
        self.dataset = PackedDataset(mix, encoder, cfg.packing, cfg.data.seed, s.rank, cfg.batch.num_workers,
                                     data_resume)
        self.position = DataPosition(self.dataset.num_streams, **(
            {k: data_resume[k] for k in ("consumed", "streams")} if data_resume else {}))
        self.setup_evaluation(mix)
        self.logger = MetricsLogger(s.output_dir, s.rank == 0, cfg.wandb.enabled, cfg.wandb.project, self.payload,
                                    self.step if checkpoints else None)
        self.saved_step = self.step if checkpoints else None
        self.flops, self.peak = FlopModel.of(self.packed), peak_flops(device)

    def resume(self, checkpoints: list[Path]) -> tuple[int, dict | None]:
        """The step and data position of the newest checkpoint that loads (0 and None when not resuming)."""
        if not checkpoints:
            return 0, None
        checkpoint, trainer_state, data_resume, skipped = load_newest(self.engine, checkpoints, self.rank,
                                                                      self.device)
        for line in skipped:
            note(f"resume: skipping {line}", self.rank)
        if checkpoint is None:
            raise ConfigError(f"--resume: none of the checkpoints in {self.output_dir / 'checkpoints'} could be "
                              "loaded; use --overwrite to start again")
        note(f"resumed from {checkpoint} at step {trainer_state['step']}", self.rank)
        return trainer_state["step"], data_resume

    def setup_evaluation(self, mix) -> None:
        """The validation batches (this rank's share) and the generation scoring of --eval-tasks."""
        cfg, self.val, self.task_eval = self.cfg, [], None
        if cfg.schedule.eval_every:
            val, dropped = validation_batches(cfg, cfg.validation.source, cfg.validation.samples, mix, self.encoder)
            self.val = val[self.rank::self.world]
            if dropped:
                note(f"validation: {dropped} samples longer than max_tokens={cfg.packing.max_tokens} left out",
                     self.rank)
        if cfg.eval_tasks.tasks and cfg.eval_tasks.every:
            self.task_eval = GenerationEval(cfg, mix, self.encoder, self.rank, self.world)

    def loop(self) -> str | None:
        """Optimizer steps until --max-steps, a signal (``preempted``) or too many non-finite steps in a row."""
        cfg, progress = self.cfg, None
        if self.rank == 0:
            from tqdm import tqdm

            progress = tqdm(total=cfg.optim.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            set_progress_bar(progress)
        if cfg.schedule.eval_every and self.step == 0:  # the starting point of the validation curve
            self.last_val = evaluate_loss(self.engine, self.val, self.device)
            self.logger.log({"step": 0, **self.last_val})
        batches = Loader(self.dataset, cfg.batch.num_workers)
        seen = micro_batch_log(self.output_dir, self.rank, self.position.consumed)
        self.bad, stop = NonFiniteSteps(cfg.optim.max_bad_steps), None
        try:
            with StopSignals() as signals:
                while self.step < cfg.optim.max_steps and stop is None:
                    stop = self.one_step(batches, seen, signals, progress)
                self.signal_name = (signal.Signals(signals.received).name if signals.received
                                    else "a signal on another rank")
        finally:
            batches.close()
            seen.close()
            if self.task_eval is not None:
                self.task_eval.close()
            if progress is not None:
                progress.close()
                set_progress_bar(None)
        return stop

    def one_step(self, batches, seen, signals, progress) -> str | None:
        """One optimizer step, its record, validation, logging and checkpoint; a stop reason or None."""
        cfg, t_start = self.cfg, time.perf_counter()
        micro = [next(batches) for _ in range(self.grad_accum)]
        t_data = time.perf_counter() - t_start
        seen.writelines(hashlib.sha1(b["input_ids"].numpy().tobytes()).hexdigest()[:16] + "\n" for b in micro)
        seen.flush()
        try:
            stats = optimizer_step(self.engine, micro, learning_rate(cfg.optim, self.step), self.device, self.world,
                                   self.position, lambda: signals.requested)
        except RuntimeError as e:
            if self.world > 1 and not isinstance(e, CollectiveTimeout) and is_collective_failure(e):
                raise CollectiveTimeout(f"rank {self.rank}: a collective of step {self.step + 1} (gradient reduction "
                                        "or the step's all-reduce) failed: a peer rank stalled or died "
                                        f"({str(e).strip().splitlines()[0][:200]})") from None
            raise
        self.step, self.stats = self.step + 1, stats
        skipped = self.bad.record(stats["loss"], stats["grad_norm"])
        record = self.step_record(stats, time.perf_counter() - t_start, t_data, skipped)
        self.records.append(record)
        if self.step % cfg.schedule.log_every == 0 or "val_loss" in record or skipped:
            self.logger.log(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "eval_pass@2", "tokens_per_s")
                                  if record.get(k) is not None})
        if skipped:
            note(f"step {self.step}: non-finite loss {stats['loss']:.4g} or gradient norm {stats['grad_norm']:.4g}: "
                 f"step skipped ({self.bad.in_a_row} in a row, stop at {cfg.optim.max_bad_steps})", self.rank)
        if self.bad.exhausted:
            return "non-finite"
        if stats["stop"]:
            return "preempted"
        last = self.step == cfg.optim.max_steps
        if ((cfg.schedule.save_every and self.step % cfg.schedule.save_every == 0) or last) and not self.bad.in_a_row:
            self.save()
        return None

    def step_record(self, stats: dict, seconds: float, t_data: float, skipped: bool) -> dict:
        """The metrics line of a step: loss, speed, memory, MFU, and validation or task scores when due."""
        cfg, step = self.cfg, self.step
        memory = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _rss_bytes()
        record = {"step": step, **{k: stats[k] for k in ("loss", "accuracy", "answer_loss", "lr", "grad_norm",
                                                         "tokens", "samples", "padding_fraction")},
                  "tokens_per_s": stats["tokens"] / seconds, "samples_per_s": stats["samples"] / seconds,
                  "step_time_s": seconds, "data_wait_s": t_data, "skipped": skipped, "skipped_steps": self.bad.total,
                  "peak_memory_gb": memory / 2**30}
        if self.peak:
            record["mfu"] = self.flops.step(stats["tokens"], stats["labels"], stats["sum_sq_lengths"]) / seconds \
                / (self.peak * self.world)
        last = step == cfg.optim.max_steps
        if cfg.schedule.eval_every and (step % cfg.schedule.eval_every == 0 or last):
            self.last_val = evaluate_loss(self.engine, self.val, self.device)
            record.update(self.last_val)
        if self.task_eval is not None and (step % cfg.eval_tasks.every == 0 or last):
            record.update(self.task_eval(self.packed, self.device))
        return record

    def save(self) -> None:
        save_checkpoint(self.engine, self.model, self.tokenizer, self.output_dir, self.step, self.rank,
                        {"step": self.step}, self.position.state(), self.payload, self.cfg.schedule.keep_checkpoints)
        self.saved_step = self.step

    def finish(self, stop: str | None) -> list[dict]:
        """A stopped run raises ``RunStopped`` after what can be saved is saved; a finished one publishes the final
        adapter or model and the summary."""
        finite = weights_finite(self.packed)
        if stop == "preempted":
            if self.saved_step != self.step and finite:
                self.save()
            self.end("preempted")
            raise RunStopped(f"stopped by {self.signal_name} after step {self.step}: "
                             + (f"checkpoint step-{self.saved_step:06d} written; continue with --resume"
                                if self.saved_step is not None else "no checkpoint (the weights are not finite)"),
                             EXIT_PREEMPTED)
        if stop == "non-finite" or not finite:  # not finite alone: e.g. resumed from a damaged checkpoint
            self.end("non-finite")
            raise RunStopped(f"stopped at step {self.step}: {self.non_finite_cause(stop, finite)} Lower --lr or "
                             "check the data.", EXIT_NON_FINITE)
        self.end("done")
        if self.rank == 0:
            final = self.output_dir / ("adapter" if hasattr(self.model, "peft_config") else "model")
            save_hf(self.model, self.tokenizer, final)
            summary = run_summary(self.cfg, self.records, self.last_val, final, time.perf_counter() - self.started)
            write_atomic(self.output_dir / "summary.json", json.dumps(json_safe(summary), indent=2))
            note(summary["line"], self.rank)
        barrier("the end of training")
        return self.records

    def end(self, status: str) -> None:
        write_rank_summary(self.output_dir, self.rank, self.packed, self.position.consumed, status, self.step)
        self.logger.close()

    def non_finite_cause(self, stop: str | None, finite: bool) -> str:
        newest = (f"checkpoint step-{self.saved_step:06d} is the last good one" if self.saved_step is not None
                  else "no checkpoint")
        if stop != "non-finite":
            return f"the weights are not finite (a damaged checkpoint or a diverged step); nothing published, {newest}."
        why = "" if finite else " The weights themselves are not finite (a damaged checkpoint?)."
        return (f"{self.bad.in_a_row} steps in a row had a non-finite loss or gradient norm (last: loss "
                f"{self.stats['loss']:.4g}, grad norm {self.stats['grad_norm']:.4g}); nothing saved, {newest}.{why}")


def run_summary(cfg: TrainConfig, records: list[dict], last_val: dict, final: Path, seconds: float) -> dict:
    """Where everything is and how training went, as a dict and as the one line printed at the end."""
    out = Path(cfg.run.output_dir)
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
