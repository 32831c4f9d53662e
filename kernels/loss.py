"""Cross-entropy on trained tokens only, in chunks, without ever holding the full fp32 logits.

Only the positions that have a label are projected to the vocabulary, followed by the model's own logit transform
(a scale, e.g. Granite's ``1 / logits_scaling`` or Cohere's ``logit_scale``, then Gemma's final soft-cap).

Two paths, the same numbers:

- a plain ``nn.Linear`` head (frozen or trained, tied or not) goes through ``FusedLinearCrossEntropy``: each chunk's
  logits give the loss *and* their gradient at once (softmax minus one-hot), which is projected back to the hidden
  states (and the weight, when it trains) right away; the backward pass only scales what was kept. No logits are
  recomputed and none outlive their chunk.
- any other head (a PEFT adapter on it: its low-rank term must be included, no merged vocabulary-sized weight
  formed) is called as a module on each chunk, with the chunk's logits recomputed in the backward pass
  (activation checkpointing).

Positions, targets and the answer mask come precomputed from the data workers, so nothing here reads a device
value back to the host.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

N_STATS = 5  # labelled tokens, correct, answer loss, answer tokens, answer correct


def _transform(logits: torch.Tensor, scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if scale != 1.0:
        logits = logits * scale
    if softcap is None:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


def _stats(losses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    right = (logits.argmax(dim=-1) == targets).double()
    a = answer.double()
    return torch.stack([torch.ones_like(a).sum(), right.sum(), (losses.detach().double() * a).sum(), a.sum(),
                        (right * a).sum()])


def _chunk(hidden: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor, head: Callable, scale: float,
           softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits, _ = _transform(head(hidden).float(), scale, softcap)
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses.sum(), _stats(losses, logits, targets, answer)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses of ``hidden @ weight.T + bias`` (then the logit transform), gradients computed with the
    loss, chunk by chunk. Returns (loss sum, detached stats)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, answer, chunk_tokens, scale, softcap):
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] \
            else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        stats = torch.zeros(N_STATS, dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            y = targets[start:start + chunk_tokens]
            logits, capped = _transform(F.linear(h, weight, bias).float(), scale, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            losses = lse - logits.gather(1, y[:, None])[:, 0]
            loss += losses.sum()
            stats += _stats(losses, logits, y, answer[start:start + chunk_tokens])
            grad = torch.exp(logits - lse[:, None])  # d loss / d logits: softmax minus one-hot
            grad[torch.arange(len(y), device=grad.device), y] -= 1.0
            if capped is not None:
                grad *= 1.0 - capped * capped
            if scale != 1.0:
                grad *= scale
            grad = grad.to(hidden.dtype)
            grad_hidden[start:start + chunk_tokens] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        g = grad_loss.to(grad_hidden.dtype)
        return (grad_hidden * g, None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(ctx.weight_dtype), None, None, None, None,
                None)


def chunked_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          positions: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor | None = None,
                          chunk_tokens: int = 2048, scale: float = 1.0,
                          softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses at ``positions`` (with grad), and detached float64 stats (see ``N_STATS``).

    ``hidden`` is ``[T, d]``; ``positions`` ``[n]`` the rows that predict ``targets`` ``[n]``; ``answer`` ``[n]``
    marks the targets of the answer span (None: all).
    """
    hidden = hidden.index_select(0, positions)
    if answer is None:
        answer = torch.ones_like(targets, dtype=torch.bool)
    if type(head) is nn.Linear:
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            return FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, answer, chunk_tokens, scale,
                                                 softcap)
    loss = hidden.new_zeros((), dtype=torch.float32)
    stats = torch.zeros(N_STATS, dtype=torch.float64, device=hidden.device)
    for start in range(0, len(positions), chunk_tokens):
        args = (hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                answer[start:start + chunk_tokens], head, scale, softcap)
        if torch.is_grad_enabled():
            chunk_loss, chunk_stats = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            chunk_loss, chunk_stats = _chunk(*args)
        loss = loss + chunk_loss
        stats = stats + chunk_stats.detach()
    return loss, stats
