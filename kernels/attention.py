"""Attention on packed micro-batches: tokens attend only within their own sample.

Each backend is a transformers attention function (registered under ``arc25-<backend>``) that reads the
packer's ``cu_seq_lens_q``/``max_length_q`` from the forward kwargs; it never re-infers boundaries from
``position_ids``. Inputs are ``[1, heads, T, head_dim]``; outputs ``[1, T, heads, head_dim]``.
"""
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("flash-attn", "torch-varlen", "sdpa")


def _sdpa_per_sample(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Any device: causal SDPA on each sample's slice."""
    bounds = kwargs["cu_seq_lens_q"].tolist()
    p = dropout if module.training else 0.0
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=p,
                                           is_causal=True, scale=scaling, enable_gqa=True)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CUDA: PyTorch's built-in varlen flash attention."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0),
                      enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None


def _flash_attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CUDA with the optional flash-attn package: its varlen kernel."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout if module.training else 0.0,
                                 softmax_scale=scaling, causal=True)
    return out.unsqueeze(0), None


FUNCTIONS = {"flash-attn": _flash_attn, "torch-varlen": _torch_varlen, "sdpa": _sdpa_per_sample}


def available_backends(device: torch.device) -> list[str]:
    out = []
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            out.append("flash-attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            out.append("torch-varlen")
    return out + ["sdpa"]


def choose_backend(name: str, device: torch.device) -> str:
    available = available_backends(device)
    if name == "auto":
        return available[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto or one of {', '.join(BACKENDS)}")
    if name not in available:
        raise ValueError(f"attention backend {name} is not available on {device.type} "
                         f"(available: {', '.join(available)})")
    return name


def register(name: str) -> str:
    """Register the backend with transformers and return the ``attn_implementation`` name to use."""
    from transformers import AttentionInterface

    key = f"arc25-{name}"
    AttentionInterface.register(key, FUNCTIONS[name])
    return key


def packed_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The forward kwargs that carry sample boundaries to every attention layer."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_seqlen,
            "max_length_k": max_seqlen}
