"""Solving ARC tasks with a model: generation and decoding, running programs, scoring and ranking answers.

Imports ``training`` (models, engines), ``sandbox``, ``data`` and ``runtime``; never ``commands``."""
