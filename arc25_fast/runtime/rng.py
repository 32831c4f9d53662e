"""Random streams: one pair of generators per (seed, rank, stream, block) so any block can be replayed."""
import random
from dataclasses import dataclass

import numpy as np


@dataclass
class Rng:
    """Python's ``random`` for scalar draws (fast) and NumPy's for arrays, seeded together."""

    py: random.Random
    np: np.random.Generator

    def below(self, n: int) -> int:
        """A uniform integer in [0, n); ``random.randrange`` costs ten times more."""
        return int(self.py.random() * n)

    def between(self, lo: int, hi: int) -> int:
        """A uniform integer in [lo, hi]."""
        return lo + int(self.py.random() * (hi - lo + 1))

    @classmethod
    def for_block(cls, *keys: int) -> "Rng":
        seq = np.random.SeedSequence([int(k) for k in keys])
        return cls(random.Random(int(seq.generate_state(2, np.uint64)[0])), np.random.Generator(np.random.PCG64(seq)))
