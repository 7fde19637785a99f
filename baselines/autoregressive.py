"""Autoregressive sampling in raster order, with and without a key/value cache.

Both draw token i of sample i's stream from the same uniform (one per position, drawn up front), so
the cached and recomputing executions give the same tokens for the same seeds.
"""
from __future__ import annotations

import torch

from bench.errors import BenchError
from bench.models import Transformer
from bench.samplers import Sampler, SampleNoise, SamplerSettings, draw_tokens, register_sampler


class AutoregressiveSampler(Sampler):
    name = "autoregressive"
    takes_steps = False

    def __init__(self, prior: Transformer, use_cache: bool = True):
        super().__init__(prior.cfg.block_size, prior.cfg.codebook_size)
        if not prior.cfg.causal:
            raise BenchError("the autoregressive sampler needs a causal prior (hparams.causal = true)")
        self.prior = prior.eval()
        self.use_cache = use_cache
        if not use_cache:
            self.name = "autoregressive-recompute"

    @torch.no_grad()
    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        self.check(settings)
        B, L = len(noise), self.seq_len
        u = noise.rand(L)
        x = torch.zeros((B, L), dtype=torch.long, device=noise.device)
        cache = self.prior.new_cache(B) if self.use_cache else None
        for i in range(L):
            if cache is None:
                logits = self.prior(x[:, :i])[:, -1]
            else:  # the first call feeds only the start token, later calls only the newest token
                logits = self.prior(x[:, i - 1:i] if i else x[:, :0], cache)[:, -1]
            x[:, i] = draw_tokens(logits, u[:, i], settings.temperature, settings.top_k, settings.top_p)
        return x

    def nfe(self, settings: SamplerSettings) -> int:
        return self.seq_len

    def execution(self) -> str:
        if self.use_cache:
            return "raster order, key/value cache (Taming Transformers manner), fp32"
        return "raster order, whole prefix recomputed per token (official baseline), fp32"


def _prior(priors: dict) -> Transformer:
    if "autoregressive" not in priors:
        raise BenchError("the autoregressive samplers need an autoregressive prior; "
                         "set priors.autoregressive for this dataset in bench.toml")
    return priors["autoregressive"]


@register_sampler("autoregressive", prior="autoregressive")
def _cached(priors: dict, device="cpu") -> Sampler:
    return AutoregressiveSampler(_prior(priors).to(device), use_cache=True)


@register_sampler("autoregressive-recompute", prior="autoregressive")
def _recompute(priors: dict, device="cpu") -> Sampler:
    return AutoregressiveSampler(_prior(priors).to(device), use_cache=False)
