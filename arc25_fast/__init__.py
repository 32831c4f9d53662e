"""arc25-fast: a high-throughput trainer for code LLMs on ARC tasks."""
__version__ = "0.1.0"
