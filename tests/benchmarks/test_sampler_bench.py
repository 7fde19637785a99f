"""Micro-benchmarks of the sampling pipeline: one denoiser step, one cached autoregressive token,
decoding, digits feature extraction and the digits metrics; and the cached / recomputing
autoregressive ratio at the digits shape and (BENCH_BIG=1) at the churches shape.

pytest-benchmark is disabled by default, so each runs once as a test. For numbers:

    python -m pytest tests/benchmarks/test_sampler_bench.py -s --benchmark-enable
    BENCH_BIG=1 python -m pytest tests/benchmarks/test_sampler_bench.py -s --benchmark-enable -k ratio
"""
import os
import statistics
import time

import numpy as np
import pytest
import torch

from baselines.autoregressive import AutoregressiveRecomputeSampler, AutoregressiveSampler
from bench.data import digits_split
from bench.features import load_extractor
from bench.metrics import compute_metrics
from bench.loading import load_transformer, load_vq
from bench.models import Transformer, TransformerConfig
from bench.perf import SHAPES
from bench.samplers import SampleNoise, SamplerSettings

BIG = os.environ.get("BENCH_BIG") == "1"
BATCH = 64


@pytest.fixture(scope="module")
def digits_models():
    vq, _ = load_vq("builtin:digits/vq")
    absorbing, _ = load_transformer("builtin:digits/absorbing", "absorbing")
    ar, _ = load_transformer("builtin:digits/autoregressive", "autoregressive")
    return vq, absorbing, ar


def test_one_denoiser_step(benchmark, digits_models):
    _, denoiser, _ = digits_models
    x = torch.randint(0, 65, (BATCH, 64))
    with torch.no_grad():
        benchmark(denoiser, x)


def test_one_cached_autoregressive_token(benchmark, digits_models):
    _, _, ar = digits_models
    cache = ar.new_cache(BATCH)
    with torch.no_grad():
        ar(torch.zeros(BATCH, 0, dtype=torch.long), cache)
        for _ in range(31):  # a half-filled cache: the middle of a sample
            ar(torch.zeros(BATCH, 1, dtype=torch.long), cache)

        def one_token():
            cache.length = 32
            ar(torch.zeros(BATCH, 1, dtype=torch.long), cache)

        benchmark(one_token)


def test_decoding(benchmark, digits_models):
    vq, _, _ = digits_models
    codes = torch.randint(0, 64, (BATCH, 8, 8))
    benchmark(vq.decode, codes)


def test_digits_features(benchmark):
    extractor = load_extractor("digits")
    images = digits_split("heldout").images[:BATCH]
    benchmark(extractor, images)


def test_digits_metrics(benchmark):
    rng = np.random.default_rng(0)
    fake, real = rng.normal(size=(1000, 128)), rng.normal(size=(1297, 128))
    benchmark(compute_metrics, fake, real)


def _median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("shape", ["digits", "churches"])
def test_cached_vs_recompute_ratio(shape, digits_models):
    """img/s of the cached autoregressive sampler over the recomputing one, same weights and batch,
    measured in one process. The tokens are identical (tests/test_baselines.py)."""
    if shape == "churches" and not BIG:
        pytest.skip("the churches shape takes minutes on a CPU; set BENCH_BIG=1")
    if shape == "digits":
        prior, batch, repeats = digits_models[2], BATCH, 3
    else:
        torch.manual_seed(0)
        prior, batch, repeats = Transformer(TransformerConfig(**SHAPES["churches"][0], causal=True)).eval(), 2, 1
    settings = SamplerSettings("autoregressive", None, 1.0)
    times = {}
    for use_cache in (True, False):
        sampler = (AutoregressiveSampler if use_cache else AutoregressiveRecomputeSampler)(prior)
        times[use_cache] = _median_seconds(lambda: sampler.sample(SampleNoise(0, range(batch)), settings), repeats)
    ratio = times[False] / times[True]
    print(f"\n{shape}: batch {batch}, {torch.get_num_threads()} threads: cached {batch / times[True]:.2f} img/s, "
          f"recompute {batch / times[False]:.3f} img/s, ratio {ratio:.1f}x")


@pytest.mark.parametrize("spec", ["skip-idle+head-where-drawn", "bf16", "fast"])
def test_switches_vs_plain_ratio(spec, digits_models):
    """img/s of the absorbing sampler at 64 steps (64 tokens) under speed switches over the plain fp32
    path, same weights and batch, measured in one process. Exact switches give the plain tokens
    (checked here too); bf16 agrees in distribution (tests/test_execution.py)."""
    from bench.samplers.absorbing import AbsorbingSampler
    from bench.execution import Execution
    denoiser = digits_models[1]
    settings = SamplerSettings("absorbing", 64, 1.0)
    plain, fast = AbsorbingSampler(denoiser), AbsorbingSampler(denoiser, execution=Execution.parse(spec))
    run = lambda s: s.sample(SampleNoise(0, range(BATCH)), settings)  # noqa: E731
    times = {name: _median_seconds(lambda s=s: run(s), 3) for name, s in (("plain", plain), ("fast", fast))}
    if "bf16" not in fast.options:
        assert torch.equal(run(plain), run(fast))
    print(f"\nabsorbing 64 steps, batch {BATCH}, {torch.get_num_threads()} threads, {fast.options.spec()}: "
          f"{BATCH / times['fast']:.1f} vs plain {BATCH / times['plain']:.1f} img/s, "
          f"{times['plain'] / times['fast']:.2f}x, {fast.passes_per_image:.1f} passes/img")
