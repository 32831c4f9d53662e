"""Cross-entropy on trained tokens only, in chunks, without ever holding the full fp32 logits.

Only the positions that have a label are projected to the vocabulary, through the LM head *module* (so a PEFT
adapter on it adds its low-rank term; no merged vocabulary-sized weight is formed), followed by the model's
own logit transform (a scale, e.g. Granite's ``1 / logits_scaling`` or Cohere's ``logit_scale``, then Gemma's
final soft-cap). Each chunk's logits are recomputed in the backward pass (activation checkpointing), so the
peak is one chunk of ``chunk_tokens x vocab``. Positions, targets and the answer mask come precomputed from the
data workers, so nothing here reads a device value back to the host.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

N_STATS = 5  # labelled tokens, correct, answer loss, answer tokens, answer correct


def _chunk(hidden: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor, head: Callable, scale: float,
           softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    losses = F.cross_entropy(logits, targets, reduction="none")
    right = (logits.argmax(dim=-1) == targets).double()
    a = answer.double()
    stats = torch.stack([torch.ones_like(a).sum(), right.sum(), (losses.detach().double() * a).sum(), a.sum(),
                         (right * a).sum()])
    return losses.sum(), stats


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
