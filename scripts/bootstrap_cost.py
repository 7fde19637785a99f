"""What bench.stats' bootstrap costs, on random Gaussian features standing in for real ones:

    python scripts/bootstrap_cost.py --n 1000 --dim 128 --resamples 500       # digits
    python scripts/bootstrap_cost.py --n 50000 --ref-n 5000 --dim 2048 --resamples 2 --fid-only  # Inception: FID
    python scripts/bootstrap_cost.py --n 10000 --dim 2048 --resamples 0,200 --no-fid  # Inception: the rest

Prints wall and CPU seconds of each phase: the reference (once per run), FID (per resample: a
weighted N x D x D covariance and a D x D eigendecomposition), and the k-NN / kernel passes (the
N x N and N x M blocks once, plus resample-dependent products, N^2 x resamples). The phases scale
as: reference M^2 D; FID resamples x (N D^2 + D^3); passes (N^2 + N M) x (D + 2 resamples).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stats  # noqa: E402


def timed(label: str, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"  {label}: {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="generated samples (and reference samples, unless --ref-n)")
    p.add_argument("--ref-n", type=int, help="reference samples (FID's cost does not depend on them)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--resamples", default="500", help="comma-separated counts to time")
    p.add_argument("--fid-only", action="store_true", help="time only the per-resample FID")
    p.add_argument("--no-fid", action="store_true", help="time the k-NN and kernel passes without FID")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.ref_n or args.n, args.dim))
    fake = rng.normal(size=(args.n, args.dim)) * 1.1 + 0.1
    print(f"N = {args.n}, M = {len(real)}, D = {args.dim}, {args.threads} thread(s), {args.device}")
    ref = timed("reference (mean, covariance root, k-NN radii, kernel sum)", lambda: stats.Reference(real, device=args.device))
    x = torch.from_numpy(fake).to(args.device)
    for b in [int(v) for v in args.resamples.split(",")]:
        w = torch.cat([torch.ones(1, args.n), stats.resample_counts(args.n, b, 0)]).to(args.device)
        print(f"{b} resamples (+ the point estimate):")
        if not args.no_fid:
            timed("FID", lambda: stats._fid(x, w, ref, w.double().sum(1)))
        if args.no_fid:
            stats._fid = lambda x, w, ref, size: torch.zeros(len(w))
            timed("k-NN and kernel passes (no FID)", lambda: stats.bootstrap_replicates(fake, ref, w))
        elif not args.fid_only:
            timed("all metrics (FID included)", lambda: stats.bootstrap_replicates(fake, ref, w))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")


if __name__ == "__main__":
    main()
