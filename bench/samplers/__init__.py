"""Samplers: the interface (base), per-sample noise, the shared token draw, the paper's absorbing
sampler and the random-codes control. The baselines live in baselines/; every sampler is registered
in one place, bench.samplers.registry."""
from .base import Sampler, SamplerSettings, generate
from .draw import FiniteLogits, draw_tokens, filter_logits
from .noise import SampleNoise, sample_seed

__all__ = ["Sampler", "SamplerSettings", "generate", "FiniteLogits", "draw_tokens", "filter_logits",
           "SampleNoise", "sample_seed"]
