"""What every command that trains shares (``train``, ``ttt``, profiling, ``search-and-learn``): the model with its
adapter and packed loss, the learning-rate schedule and one optimizer step whose loss is the mean over the global
batch's labels. See ``train`` for why the loss is normalised as it is."""
import hashlib
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.grids import DataError
from ..data.stream import DataPosition, PackedStream, to_torch
from ..kernels import attention
from ..runtime.distributed import all_reduce
from ..runtime.faults import NonFiniteSteps
from .local_engine import LocalEngine
from .model import (
    PackedCausalLM,
    add_adapter,
    check_packed_model,
    is_random_init,
    load_base_model,
    model_inputs,
    resolve_dtype,
)
from .options import Optimisation, TrainingParts


def learning_rate(optim: Optimisation, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine or linear decay to 0 at ``max_steps`` (or constant)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
    if optim.lr_schedule == "linear":
        return optim.lr * (1.0 - progress)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


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
                   position: DataPosition | None = None, stop_requested=lambda: False,
                   timer: StepTimer | None = None) -> dict:
    """One optimizer step over this rank's micro-batches; the loss is the mean over the global batch's labels.

    A non-finite micro-batch loss turns that micro-batch's gradient into NaN (on the device, no sync), so DeepSpeed's
    check of the global gradient norm skips the whole step on every rank: weights and optimizer state stay as they
    were. ``stop_requested()`` (a signal on this rank), asked after the step's last micro-batch, is reduced with the
step's statistics, so all ranks agree to stop after this step.
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
    totals = torch.zeros(8, dtype=torch.float64, device=device)  # loss, 5 stats, stop flag, local grad norm
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
    totals[6] = float(stop_requested())
    local = isinstance(engine, LocalEngine)
    if local:  # read with the loss: the step's one host sync
        totals[7] = engine.grad_norm
    loss_sum, _, correct, answer_loss, answer_n, answer_correct, stop, norm = all_reduce(totals, device,
                                                                                          "the step's loss")
    grad_norm = norm if local else engine.get_global_grad_norm()
    return {"loss": loss_sum / n_labels, "accuracy": correct / n_labels, "answer_loss": answer_loss / max(answer_n, 1),
            "lr": lr, "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "tokens": int(n_tokens),
            "samples": int(n_samples), "labels": int(n_labels), "padding_fraction": 1.0 - n_tokens / n_positions,
            "sum_sq_lengths": int(sum_sq), "stop": stop > 0}


def build_model(cfg: TrainingParts, vocab_size: int, device: torch.device, output_dir: Path | None = None,
                rank: int = 0) -> tuple[nn.Module, PackedCausalLM, str]:
    """The (adapter-wrapped) model, its packed-loss wrapper on ``device``, and the attention backend used.

    The base model is checked against its own per-sample outputs before anything trains (``check_packed_model``).
    """
    dtype = resolve_dtype(cfg.model.dtype, device)
    backend = attention.choose_backend(cfg.packed.attn, device)
    key = attention.register(backend)
    base = load_base_model(cfg.model.name, vocab_size, dtype, key, cfg.data.seed)
    if output_dir is not None and is_random_init(cfg.model.name):  # so the adapter's base model can be loaded again
        if rank == 0:
            base.save_pretrained(str(output_dir / "base_model"))
        base.name_or_path = base.config.name_or_path = str((output_dir / "base_model").resolve())
    base.to(device)
    check_packed_model(base, key)
    if cfg.packed.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    torch.manual_seed(cfg.data.seed)  # the adapter's random init (LoRA A) is seeded whatever the base model was
    model = add_adapter(base, cfg)
    return model, PackedCausalLM(model, cfg.packed.loss_chunk_tokens).to(device), backend


def weights_finite(packed: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in packed.parameters() if p.requires_grad)


def stream_id(*keys: str) -> int:
    """A data stream of these keys' own (a task, a task's round): its samples do not depend on what ran before."""
    return int(hashlib.sha1("/".join(keys).encode()).hexdigest()[:7], 16)


def snapshot(packed: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (the adapter, or every weight with full fine-tuning)."""
    return {n: p.detach().clone() for n, p in packed.named_parameters() if p.requires_grad}


def reset(engine, packed: nn.Module, weights: dict[str, torch.Tensor] | None) -> None:
    """Trainable weights set to ``weights`` (None: kept), ZeRO's fp32 master copy refreshed from them, optimizer
    state cleared: the engine starts again in place, nothing reloaded."""
    if weights is not None:
        with torch.no_grad():
            for name, p in packed.named_parameters():
                if name in weights:
                    p.copy_(weights[name])
    if isinstance(engine, LocalEngine):
        engine.reset()
        return
    engine.optimizer.refresh_fp32_params()
    engine.optimizer.optimizer.state.clear()
    engine.zero_grad()


def fine_tune(cfg: TrainingParts, engine, mix, encoder, stream: int, steps: int, device: torch.device,
              stop_requested=lambda: False) -> dict:
    """``steps`` optimizer steps on packed samples drawn from ``mix`` (stream ``stream`` of ``cfg.data.seed``, so
    the samples depend on nothing that ran before), the learning-rate schedule spread over ``steps``. The packing
    buffer is capped at 8 samples per micro-batch the phase takes (at least 64): a phase of a few steps does not
    encode a training run's ``--pack-buffer`` of samples first.

    Returns the losses, counts, ``data_seconds`` (waiting for packed batches) and a status: done, stopped (a signal:
    the step finished, nothing saved), too-long (no sample fits ``--max-tokens``) or non-finite (``--max-bad-steps``
    non-finite steps in a row)."""
    schedule = replace(cfg.optim, max_steps=steps)
    packing = replace(cfg.packing, buffer_size=min(cfg.packing.buffer_size, max(64, 8 * steps * cfg.optim.grad_accum)))
    batches = iter(PackedStream(mix, encoder, packing, cfg.data.seed, rank=0, stream=stream))
    bad = NonFiniteSteps(cfg.optim.max_bad_steps)
    losses, tokens, samples, status, error, data_seconds = [], 0, 0, "done", None, 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        try:
            micro = [to_torch(next(batches)) for _ in range(cfg.optim.grad_accum)]
        except DataError as e:  # e.g. every sample is longer than --max-tokens
            status, error = "too-long", str(e)
            break
        finally:
            data_seconds += time.perf_counter() - t0
        stats = optimizer_step(engine, micro, learning_rate(schedule, step), device, world=1,
                               stop_requested=stop_requested)
        losses.append(stats["loss"])
        tokens, samples = tokens + stats["tokens"], samples + stats["samples"]
        bad.record(stats["loss"], stats["grad_norm"])
        if stats["stop"]:
            status = "stopped"
            break
        if bad.exhausted:
            status, error = "non-finite", f"{bad.in_a_row} non-finite steps in a row"
            break
    tail = [x for x in losses[-5:] if x == x]
    return {"status": status, "error": error, "steps": len(losses), "losses": losses,
            "final_loss": sum(tail) / len(tail) if tail else None, "tokens": tokens, "samples": samples,
            "data_seconds": data_seconds}
