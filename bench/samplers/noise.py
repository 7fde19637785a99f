"""Per-sample random streams.

Sample i draws every random number it uses from its own generator seeded by (seed, i), and always
draws the same amount in the same order, so its tokens depend only on (seed, i): never on batch size,
device count or resume point (up to float rounding of the network between batch sizes; see
tests/test_sampling.py).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


class SampleNoise:
    """Uniform [0, 1) draws from one generator per sample, stacked along the batch dimension."""

    def __init__(self, seed: int, indices: Iterable[int], device="cpu"):
        self.device = torch.device(device)
        self.indices = list(indices)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, int(i)))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])
