"""What every command that trains shares (``train``, ``ttt``, profiling, ``search-and-learn``): the model with its
adapter and packed loss, the learning-rate schedule and one optimizer step whose loss is the mean over the global
batch's labels. See ``train`` for why the loss is normalised as it is."""
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .engine import all_reduce
from .kernels import attention
from .model import PackedCausalLM, add_adapter, check_packed_model, is_random_init, load_base_model, resolve_dtype
from .stream import DataPosition
from .validation import model_inputs


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
    totals[6] = float(stop_requested())
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
    torch.manual_seed(cfg.data.seed)  # the adapter's random init (LoRA A) is seeded whatever the base model was
    model = add_adapter(base, cfg)
    return model, PackedCausalLM(model, cfg.loss_chunk_tokens).to(device), backend


def weights_finite(packed: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in packed.parameters() if p.requires_grad)
