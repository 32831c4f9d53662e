"""Hot code of arc25-fast, installed as ``arc25_fast.kernels``.

- ``grid_tokens``: numba kernels that write ARC grids straight to token ids.
- ``packing``: numba best-fit-decreasing packer and micro-batch assembly (no padding).
- ``attention``: varlen attention backends fed with the packer's ``cu_seqlens``.
- ``loss``: chunked cross-entropy that never materialises the full logits.
"""
