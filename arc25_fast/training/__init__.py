"""Training: the model and its adapters, the optimizer engines, the step, checkpoints, metrics, validation, checks.

Imports ``data``, ``runtime`` and ``kernels``; never ``solving`` or ``commands``."""
