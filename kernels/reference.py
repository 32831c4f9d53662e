"""Reference implementations of the CUDA varlen attention kernels, with exactly their signatures.

``varlen_attn`` is ``torch.nn.attention.varlen.varlen_attn`` (torch 2.13) and ``flash_attn_varlen_func`` is
flash-attn 2.8's. Each computes plain attention per segment in fp32, so the code that calls the real kernels
(transposes, GQA, causal windows, ``cu_seqlens`` dtype and device, ``max_seqlen``) can run on CPU: tests swap them
into ``arc25_fast.kernels.attention.KERNELS``. They mirror the kernels' contract strictly: ``cu_seqlens`` must be
int32 on the inputs' device, ``max_seqlen`` must cover every segment, grouped-query attention must be enabled
explicitly for ``varlen_attn``; rows past the last segment are left NaN, as uninitialised memory would be
(a caller that passes them gets NaN, as ``varlen_attn``'s backward does).

Window semantics are flash-attn's: query ``i`` sees keys ``j`` with ``i - left <= j <= i + right`` (-1: no limit).
"""
import torch


def _check(q, k, v, cu_q, cu_k, max_q, max_k):
    for name, cu in (("cu_seq_q", cu_q), ("cu_seq_k", cu_k)):
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device}, the inputs on {q.device}")
    if not torch.equal(cu_q, cu_k):
        raise NotImplementedError("the reference covers self-attention (equal query and key segments)")
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    if max(lengths) > max_q or max(lengths) > max_k:
        raise ValueError(f"max_seqlen {max_q} is shorter than a segment of {max(lengths)} tokens")
    if q.shape[0] < int(cu_q[-1]):
        raise ValueError(f"segments end at {int(cu_q[-1])} but there are only {q.shape[0]} query rows")


def _attend(q, k, v, bounds, scale, left, right, softcap):
    """[T, Hq, D] attention per segment in fp32; rows past the last segment stay NaN."""
    out = torch.full(q.shape, float("nan"), dtype=torch.float32, device=q.device)
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].float().transpose(0, 1)
        ks = k[s:e].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        vs = v[s:e].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(e - s, device=q.device)
        allowed = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device)
        if left >= 0:
            allowed &= i[None, :] >= i[:, None] - left
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[s:e] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out.to(q.dtype)


def varlen_attn(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                cu_seq_k: torch.Tensor | None, max_q: int, max_k: int, *, return_aux=None, scale: float | None = None,
                window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False, seqused_k=None, block_table=None,
                num_splits: int | None = None) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn``'s contract, computed per segment in fp32."""
    if return_aux is not None or seqused_k is not None or block_table is not None:
        raise NotImplementedError("the reference covers training: no aux output, KV cache or paged blocks")
    cu_seq_k = cu_seq_q if cu_seq_k is None else cu_seq_k
    _check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"{query.shape[1]} query heads and {key.shape[1]} key heads need enable_gqa=True")
    left, right = window_size
    return _attend(query, key, value, cu_seq_q.tolist(), scale, left, right, 0.0)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.8's ``flash_attn_varlen_func`` contract, computed per segment in fp32 (no dropout)."""
    if dropout_p or alibi_slopes is not None or return_attn_probs or block_table is not None:
        raise NotImplementedError("the reference covers dropout-free training without ALiBi, probabilities or pages")
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    left, right = window_size
    if causal:
        right = 0
    return _attend(q, k, v, cu_seqlens_q.tolist(), softmax_scale, left, right, softcap)
