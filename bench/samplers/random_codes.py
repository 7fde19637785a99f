"""The `random-codes` control: every token uniform over the codebook, decoded (a ceiling for FID)."""
from __future__ import annotations

import torch

from .base import Sampler, SamplerSettings
from .noise import SampleNoise


class RandomCodesSampler(Sampler):
    name = "random-codes"
    takes_steps = False
    takes_temperature = False
    control = True
    method = "uniform random codes, no network"

    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        u = noise.rand(self.seq_len)
        return (u * self.codebook_size).long().clamp_(max=self.codebook_size - 1)

    def nfe(self, settings: SamplerSettings) -> int:
        return 0
