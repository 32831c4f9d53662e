"""Cross-entropy on answer tokens only, in chunks, without ever holding the full fp32 logits.

Only positions with a label are projected to the vocabulary; each chunk's logits are recomputed in the
backward pass (activation checkpointing), so the peak is one chunk of ``chunk_tokens x vocab``.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(dim=-1) == labels).sum()
    return loss, correct


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, chunk_tokens: int = 2048):
    """Sum of token losses, number of labelled tokens, and correctly predicted tokens (argmax).

    ``hidden`` is ``[T, d]``, ``labels`` ``[T]`` already shifted (``-100``: no label).
    """
    index = (labels != -100).nonzero().squeeze(1)
    hidden, labels = hidden.index_select(0, index), labels.index_select(0, index)
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, len(index), chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            chunk_loss, chunk_correct = checkpoint(_chunk, h, weight, bias, y, use_reentrant=False)
        else:
            chunk_loss, chunk_correct = _chunk(h, weight, bias, y)
        loss = loss + chunk_loss
        correct = correct + chunk_correct
    return loss, len(index), correct
