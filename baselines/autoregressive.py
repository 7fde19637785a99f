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


def draw_in_raster_order(noise: SampleNoise, length: int, logits_at, draw) -> torch.Tensor:
    """The loop of every raster-order sampler: token i of each sample, i = 0 .. length - 1, drawn by
    draw(logits, uniforms, finite) from logits_at(i, x) (x: the tokens so far, zeros from i on) with
    the i-th uniform of the sample's stream (all drawn up front). -> (B, length) tokens."""
    u = noise.rand(length)
    x = torch.zeros((len(noise), length), dtype=torch.long, device=noise.device)
    finite = FiniteLogits()
    for i in range(length):
        x[:, i] = draw(logits_at(i, x), u[:, i], finite)
    finite.check()
    return x


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

        def draw(logits, uniforms, finite):
            return draw_tokens(logits, uniforms, settings.temperature, settings.top_k, settings.top_p, finite)
        if self.use_cache:
            return draw_in_raster_order(noise, self.seq_len, self._cached_logits(len(noise), noise.device), draw)
        return draw_in_raster_order(noise, self.seq_len, lambda i, x: self.net(x[:, :i])[:, -1], draw)

    def _cached_logits(self, batch: int, device):
        """logits_at for draw_in_raster_order: the first call feeds only the start token, later calls
        only the newest token."""
        cache = self._cache_for(batch)

        def logits_at(i: int, x: torch.Tensor) -> torch.Tensor:
            with self.options.autocast(device):
                if i == 0 or not self.options.compiled:
                    hidden = self.prior.hidden(x[:, i - 1:i] if i else x[:, :0], cache)
                else:
                    hidden = self._step(x[:, i - 1:i], torch.tensor([i], device=device), cache)
            return self.net.project(hidden[:, -1])
        return logits_at

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
