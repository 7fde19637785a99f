"""Baselines: autoregressive with and without cache, and MaskGIT's schedule."""
import math

import numpy as np
import pytest
import torch

from baselines.autoregressive import AutoregressiveRecomputeSampler, AutoregressiveSampler
from baselines.maskgit import MaskGITSampler, masked_after_step
from bench.errors import BenchError
from bench.models import Transformer, TransformerConfig
from bench.samplers import SampleNoise, SamplerSettings, generate


def tiny(causal, seq_len=16, codebook=12, seed=0):
    torch.manual_seed(seed)
    m = Transformer(TransformerConfig(codebook_size=codebook, block_size=seq_len, n_layers=2, n_head=2,
                                      n_emb=32, causal=causal))
    with torch.no_grad():  # larger weights than the init, so logits differ between positions
        for p in m.parameters():
            p.mul_(8.0) if p.dim() >= 2 else None
    return m.eval()


@pytest.mark.parametrize("settings", [SamplerSettings("autoregressive", None, 1.0),
                                      SamplerSettings("autoregressive", None, 0.0),
                                      SamplerSettings("autoregressive", None, 0.8, top_k=5),
                                      SamplerSettings("autoregressive", None, 1.2, top_p=0.9)])
def test_cached_and_recompute_give_identical_tokens(settings):
    prior = tiny(causal=True)
    cached = generate(AutoregressiveSampler(prior), settings, 5, range(24), 24, progress=False)
    recompute = generate(AutoregressiveRecomputeSampler(prior), settings, 5, range(24), 24, progress=False)
    assert np.array_equal(cached, recompute)
    assert np.array_equal(generate(AutoregressiveSampler(prior), settings, 5, range(24), 5, progress=False),
                          cached)
    if settings.temperature > 0:
        assert len(np.unique(cached)) > 3  # not a degenerate constant sequence


def test_cached_logits_equal_full_forward():
    prior = tiny(causal=True)
    x = torch.randint(0, 12, (3, 15))
    full = prior(x)  # (3, 16, V): start token + 15 tokens
    cache = prior.new_cache(3)
    steps = [prior(x[:, :0], cache)] + [prior(x[:, i:i + 1], cache) for i in range(15)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_autoregressive_needs_a_causal_prior():
    with pytest.raises(BenchError, match="causal"):
        AutoregressiveSampler(tiny(causal=False))


@pytest.mark.parametrize("L, S", [(64, 1), (64, 4), (64, 8), (64, 16), (64, 64), (256, 8), (10, 10), (10, 7)])
def test_cosine_schedule(L, S):
    n = masked_after_step(L, S)
    assert len(n) == S and n[-1] == 0
    revealed = [L - n[0]] + [a - b for a, b in zip(n, n[1:])]
    assert all(r >= 1 for r in revealed) and sum(revealed) == L
    if S < L // 4:  # where no clamp binds, it is the cosine schedule itself
        assert n[:-1] == [math.floor(L * math.cos(math.pi / 2 * (s + 1) / S)) for s in range(S - 1)]


@pytest.mark.parametrize("steps", [1, 4, 8, 16])
def test_maskgit_reveals_per_schedule_and_ends_unmasked(steps):
    sampler = MaskGITSampler(tiny(causal=False))
    trace = []
    x = sampler.sample(SampleNoise(0, range(6)), SamplerSettings("maskgit", steps, 1.0), trace=trace)
    assert (x < 12).all()
    expected = [16 - n for n in masked_after_step(16, steps)]
    assert [t.tolist() for t in trace] == [[e] * 6 for e in expected]


def test_maskgit_keeps_revealed_tokens_and_is_batch_independent():
    sampler = MaskGITSampler(tiny(causal=False))
    s = SamplerSettings("maskgit", 4, 1.0)
    a = generate(sampler, s, 1, range(10), 10, progress=False)
    b = generate(sampler, s, 1, range(10), 3, progress=False)
    assert np.array_equal(a, b)
