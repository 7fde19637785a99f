"""Autoregressive sampling in raster order, with and without a key/value cache.

Both draw token i of sample i's stream from the same uniform (one per position, drawn up front), so
the cached and recomputing executions give the same tokens for the same seeds.
"""
from __future__ import annotations

import torch

from bench.errors import BenchError
from bench.execution import Execution, Network
from bench.models import Transformer
from bench.samplers import FiniteLogits, Sampler, SampleNoise, SamplerSettings, draw_tokens


class AutoregressiveSampler(Sampler):
    name = "autoregressive"
    prior_kind = "autoregressive"
    takes_steps = False
    switches = ("bf16", "compile", "cuda-graphs")
    use_cache = True

    def __init__(self, prior: Transformer, tokenizer=None, execution: Execution | None = None):
        super().__init__(prior, tokenizer, execution)
        if not prior.cfg.causal:
            raise BenchError("the autoregressive sampler needs a causal prior (hparams.causal = true)")
        self.prior = self.network
        use_cache = self.use_cache
        self.net = Network(self.prior, self.options, dynamic=not use_cache)
        if use_cache:
            self.method = "raster order, key/value cache (Taming Transformers manner)"
            # compiled: every token after the start token goes through one static-shape step
            self._step = self.options.compile(self.prior.hidden_at)
            self._caches: dict = {}
        else:
            self.method = "raster order, whole prefix recomputed per token (official baseline)"

    @torch.no_grad()
    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        self.check(settings)
        B, L = len(noise), self.seq_len
        u = noise.rand(L)
        x = torch.zeros((B, L), dtype=torch.long, device=noise.device)
        finite = FiniteLogits()
        if self.use_cache:
            self._sample_cached(x, u, settings, finite)
        else:
            for i in range(L):
                logits = self.net(x[:, :i])[:, -1]
                x[:, i] = draw_tokens(logits, u[:, i], settings.temperature, settings.top_k, settings.top_p, finite)
        finite.check()
        return x

    def _sample_cached(self, x: torch.Tensor, u: torch.Tensor, settings: SamplerSettings, finite: FiniteLogits):
        """The first call feeds only the start token, later calls only the newest token."""
        cache = self._cache_for(len(x))
        for i in range(self.seq_len):
            with self.options.autocast(x.device):
                if i == 0 or not self.options.compiled:
                    hidden = self.prior.hidden(x[:, i - 1:i] if i else x[:, :0], cache)
                else:
                    hidden = self._step(x[:, i - 1:i], torch.tensor([i], device=x.device), cache)
            logits = self.net.project(hidden[:, -1])
            x[:, i] = draw_tokens(logits, u[:, i], settings.temperature, settings.top_k, settings.top_p, finite)

    def _cache_for(self, batch: int):
        dtype = torch.bfloat16 if "bf16" in self.options else None
        if not self.options.compiled:
            return self.prior.new_cache(batch, dtype)
        # Compiled, one cache per batch size is kept at a fixed address (CUDA graphs replay pointers).
        # Reuse is safe: step i writes position i before reading it, and later positions are masked.
        cache = self._caches.get(batch)
        if cache is None:
            cache = self._caches[batch] = self.prior.new_cache(batch, dtype)
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        cache.length = 0
        return cache

    def nfe(self, settings: SamplerSettings) -> int:
        return self.seq_len


    def flops_per_image(self, settings: SamplerSettings) -> float:
        """Cached: one new token per step attending to the cache. Recomputed: the whole prefix (and
        the start token) every step."""
        cfg = self.prior.cfg
        if self.use_cache:
            return sum(cfg.forward_flops(1, i + 1) for i in range(self.seq_len))
        return sum(cfg.forward_flops(i + 1, i + 1) for i in range(self.seq_len))


class AutoregressiveRecomputeSampler(AutoregressiveSampler):
    """The same weights and tokens as `autoregressive`, the whole prefix recomputed for every token
    (the official Unleashing Transformers baseline's execution)."""
    name = "autoregressive-recompute"
    use_cache = False
    timed_by_default = False
