"""Attention on packed micro-batches: tokens attend only within their own sample.

Each backend is a transformers attention function (registered under ``arc25_packed_<backend>``) that reads the
packer's sample boundaries from the forward kwargs (``packed_kwargs``); it never re-infers them from
``position_ids``. Inputs are ``[1, heads, T, head_dim]``; outputs ``[1, T, heads, head_dim]``.

What the model asks of its attention arrives as kwargs too: a sliding window (``sliding_window``: a query sees
itself and the ``window - 1`` keys before it, as in transformers' masks) and logit soft-capping (``softcap``)
are implemented by every backend that can; anything else (e.g. attention sinks) is refused with
``PackedAttentionUnsupported``, never ignored. A layer that does not pass the boundaries at all is refused too.

The CUDA kernels are looked up through ``KERNELS`` at call time, so that tests can swap in reference
implementations with the same signatures (``kernels/reference.py``) and run the code around them on CPU.

``varlen_attn``'s signature changed between torch releases, so what it can do is read from its parameters
(``varlen_features``), never from the version string: torch 2.10 has ``is_causal`` only (no window, no scale),
2.11 adds ``scale`` and ``window_size`` (grouped-query attention is native there), 2.12+ adds ``enable_gqa`` and
``num_splits`` (``num_splits=1`` makes the result batch-invariant). A feature the installed kernel lacks is refused
with the torch version that has it.
"""
import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

BACKENDS = ("flash-attn", "torch-varlen", "sdpa")
BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "packed_bounds")
IGNORED_KWARGS = {"position_ids", "use_cache", "is_causal", "output_attentions", "dropout", "scaling",
                  "cache_position", "past_key_values", "position_embeddings"}


class PackedAttentionUnsupported(NotImplementedError):
    """The model asks its attention for something the packed backends do not implement."""


def _varlen_attn(*args, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*args, **kwargs)


def _flash_attn_varlen_func(*args, **kwargs):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(*args, **kwargs)


KERNELS = {"torch-varlen": _varlen_attn, "flash-attn": _flash_attn_varlen_func}
VARLEN_FEATURE_SINCE = {"window_size": "2.11", "scale": "2.11", "enable_gqa": "2.12", "num_splits": "2.12"}


def _kernel_function(fn):
    """The function whose parameters count: the installed kernel behind the lazy wrapper, else ``fn`` itself."""
    if fn is _varlen_attn:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    return fn


@functools.lru_cache(maxsize=8)
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(_kernel_function(fn)).parameters)


def varlen_features(fn=None) -> dict[str, bool]:
    """What the installed (or substituted) ``varlen_attn`` accepts: windows, a softmax scale, an explicit GQA flag,
    and ``num_splits`` (batch-invariant results)."""
    params = _parameters(KERNELS["torch-varlen"] if fn is None else fn)
    return {name: name in params for name in VARLEN_FEATURE_SINCE}


def varlen_keywords(window: int | None, scale: float | None, head_dim: int, gqa: bool,
                    batch_invariant: bool = False, fn=None) -> dict:
    """The keyword arguments of one causal ``varlen_attn`` call on this torch; refuses what it cannot do."""
    has = varlen_features(fn)

    def need(feature: str, what: str) -> None:
        if not has[feature]:
            raise PackedAttentionUnsupported(
                f"{what} needs torch>={VARLEN_FEATURE_SINCE[feature]} for --attn torch-varlen (this is torch "
                f"{torch.__version__}, whose varlen_attn has no {feature}); use --attn sdpa or flash-attn")

    kwargs = {}
    if has["window_size"]:
        kwargs["window_size"] = (_window_left(window), 0)
    elif window is not None:
        need("window_size", "sliding-window attention")
    else:
        kwargs["is_causal"] = True
    if scale is not None and scale != head_dim ** -0.5:
        need("scale", f"a softmax scale of {scale:g}")
        kwargs["scale"] = scale
    elif has["scale"] and scale is not None:
        kwargs["scale"] = scale
    if gqa and has["enable_gqa"]:
        kwargs["enable_gqa"] = True  # older kernels take grouped-query K/V natively, without the flag
    if batch_invariant:
        need("num_splits", "batch-invariant attention (num_splits=1)")
        kwargs["num_splits"] = 1
    return kwargs


def _options(module, backend: str, kwargs: dict) -> tuple[int | None, float | None, list[int]]:
    """The sliding window, the soft-cap and the host-side sample bounds; refuses what the backend cannot do."""
    name = type(module).__name__
    if "cu_seq_lens_q" not in kwargs or "packed_bounds" not in kwargs:
        raise PackedAttentionUnsupported(f"{name} does not pass the sample boundaries to its attention function, so "
                                         "packed samples would attend to each other")
    extra = sorted(k for k, v in kwargs.items()
                   if v is not None and k not in IGNORED_KWARGS and k not in BOUNDARY_KWARGS
                   and k not in ("sliding_window", "softcap"))
    if extra:
        raise PackedAttentionUnsupported(f"{name} asks its attention for {', '.join(extra)}, which the packed "
                                         "attention does not implement")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if softcap is not None and backend == "torch-varlen":
        raise PackedAttentionUnsupported(f"{name} uses attention logit soft-capping, which torch's varlen_attn "
                                         "does not implement (use --attn flash-attn, or sdpa)")
    return window, softcap, kwargs["packed_bounds"]


def _check_total(query: torch.Tensor, bounds: list[int]) -> None:
    # rows past the last sample would be left uninitialised by varlen kernels (NaN gradients in varlen_attn)
    if query.shape[2] != bounds[-1]:
        raise ValueError(f"packed batch holds {query.shape[2]} tokens but its samples end at {bounds[-1]}")


def _window_left(window: int | None) -> int:
    """flash-attn's ``window_size[0]``: keys to the left a query sees (-1: all)."""
    return -1 if window is None else window - 1


def _sample_attention(q, k, v, scale, window, softcap, dropout):
    """Causal attention of one sample ([1, heads, L, d]), optionally windowed and soft-capped."""
    length = q.shape[2]
    if softcap is None and (window is None or window >= length):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=True)
    i = torch.arange(length, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), p=dropout)
    return torch.matmul(probs, v)


def _sdpa_per_sample(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Any device: causal SDPA on each sample's slice (windowed or soft-capped attention when the model asks)."""
    window, softcap, bounds = _options(module, "sdpa", kwargs)
    _check_total(query, bounds)
    p = dropout if module.training else 0.0
    outs = [_sample_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scaling, window, softcap, p)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _torch_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CUDA: PyTorch's built-in varlen flash attention."""
    window, _, bounds = _options(module, "torch-varlen", kwargs)
    _check_total(query, bounds)
    if dropout and module.training:
        raise PackedAttentionUnsupported(f"{type(module).__name__} uses attention dropout, which torch's varlen_attn "
                                         "does not implement (use --attn flash-attn, or sdpa)")
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    options = varlen_keywords(window, scaling, q.shape[-1], q.shape[1] != k.shape[1])
    out = KERNELS["torch-varlen"](q, k, v, cu, cu, max_len, max_len, **options)
    return out.unsqueeze(0), None


def _flash_attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CUDA with the optional flash-attn package: its varlen kernel."""
    window, softcap, bounds = _options(module, "flash-attn", kwargs)
    _check_total(query, bounds)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    cu, max_len = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    out = KERNELS["flash-attn"](q, k, v, cu, cu, max_len, max_len, dropout_p=dropout if module.training else 0.0,
                                softmax_scale=scaling, causal=True, window_size=(_window_left(window), 0),
                                softcap=0.0 if softcap is None else softcap)
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
    """Register the backend with transformers and return the ``attn_implementation`` name to use (free of
    "sdpa"/"flash", which transformers would read as its own implementations and check the model against)."""
    from transformers import AttentionInterface

    key = {"sdpa": "arc25_packed_per_sample", "torch-varlen": "arc25_packed_torch_varlen",
           "flash-attn": "arc25_packed_fa_varlen"}[name]
    AttentionInterface.register(key, FUNCTIONS[name])
    return key


def packed_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int, bounds: list[int]) -> dict:
    """The forward kwargs that carry sample boundaries to every attention layer: ``cu_seqlens`` on the device for
    the kernels, and the same ``bounds`` as host integers so that no layer has to read them back."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_seqlen,
            "max_length_k": max_seqlen, "packed_bounds": bounds}
