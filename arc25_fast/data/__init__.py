"""ARC data: grids and their text formats, tasks and their sources, prompts, token-exact encoding, packed streams.

Imports only ``runtime`` and ``kernels``."""
