"""Running model-written programs in OS isolation: the worker pool and its isolation layers.

Imports only ``data`` (the drawing DSL a program may call) and ``runtime``."""
