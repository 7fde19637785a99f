"""Is one seed's interval honest? On digits (temperature 1), for absorbing at 8 and 64 steps and
autoregressive, several seeds of N samples each: every seed's metrics and intervals
(bench.stats.bootstrap_intervals), then per metric

- the seed-to-seed SD against the mean standard error of one seed (they should agree),
- a sharper seed-to-seed SD where a row has 10 seeds or more: the seeds' samples pooled and split
  at random into disjoint sets of N, several times over (every set is distributed as one seed's
  sample, since sample i depends only on (seed, i) and samples are independent),
- how many seeds' intervals cover the mean over seeds.

Because sample i depends only on (seed, i), the first 300 samples of a seed are what the CI
profile (N = 300) draws, so N = 300 is scored too. A regression section draws the rows again at
temperatures 1.3 and 2 (REGRESSION_ROWS) and applies `difference_test` on FID to every (T = 1 seed,
T > 1 seed) pair and to every pair of T = 1 seeds.

    python scripts/calibrate_intervals.py                  # sampling: about 20 minutes on 2 free cores
    python scripts/calibrate_intervals.py --seeds 0-4 --slow-seeds 0-4 --regression-seeds 0-2

Features are cached in --cache (one .npy per sampler row, seed, sample count and the hashes of the
checkpoints and extractor that made them), so a second call only scores.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoints import atomic_write_bytes  # noqa: E402
from bench.config import load_config, run_settings  # noqa: E402
from bench.metrics import compute_metrics, density_coverage, fid_from_stats, fid_stats, precision_recall  # noqa: E402
from bench.protocol import PlannedRow, load_pipeline, reference_features  # noqa: E402
from bench.samplers import SamplerSettings, generate  # noqa: E402
from bench.stats import METRICS, Reference, bootstrap_intervals, difference_test, summarise_repeats  # noqa: E402

ROWS = [SamplerSettings("absorbing", 8, 1.0), SamplerSettings("absorbing", 64, 1.0),
        SamplerSettings("autoregressive", None, 1.0)]
REGRESSION_ROWS = [SamplerSettings("absorbing", 8, 1.3), SamplerSettings("absorbing", 8, 2.0),
                   SamplerSettings("absorbing", 64, 1.3), SamplerSettings("autoregressive", None, 1.3),
                   SamplerSettings("autoregressive", None, 2.0)]
POOLED_MIN_SEEDS = 10


def parse_seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def features_for(pipe, settings: SamplerSettings, seed: int, n: int, cache: Path) -> np.ndarray:
    sampler = pipe.sampler(settings.sampler)
    made_by = hashlib.sha256(json.dumps([pipe.hashes, sampler.execution()], sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{settings.slug()}-seed{seed}-n{n}-{made_by}.npy"
    if path.is_file():
        try:  # a damaged file is drawn again
            feats = np.load(path, allow_pickle=False)
            if feats.shape == (n, pipe.extractor.dim) and np.isfinite(feats).all():
                return feats
        except (OSError, ValueError, EOFError):
            pass
    t0 = time.perf_counter()
    tokens = generate(sampler, settings, seed, range(n), 250, pipe.device, progress=False)
    feats = np.concatenate([pipe.extractor(sampler.tokenizer.decode(tokens[i:i + 250])) for i in range(0, n, 250)])
    buf = io.BytesIO()
    np.save(buf, feats)
    atomic_write_bytes(path, buf.getvalue())
    print(f"  sampled {settings.label()} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return feats


def score(feats: np.ndarray, ref: Reference, settings: dict, resamples: int) -> dict:
    point = compute_metrics(feats, ref.features, settings)
    return {**point, **bootstrap_intervals(feats, ref, settings, resamples=resamples, point=point)}


def pooled_sd(pool: np.ndarray, n: int, ref: Reference, settings: dict, splits: int) -> dict:
    """SD of each metric but KID (whose subset averages are slow) over disjoint sets of n drawn
    from the pooled samples, `splits` random partitions."""
    rng = np.random.default_rng(0)
    mu, sigma = fid_stats(ref.features)
    values = {m: [] for m in METRICS if m != "kid_mean"}
    for _ in range(splits):
        perm = rng.permutation(len(pool))
        for start in range(0, len(pool) - n + 1, n):
            x = pool[perm[start:start + n]]
            values["fid"].append(fid_from_stats(*fid_stats(x), mu, sigma))
            for k, v in {**precision_recall(x, ref.features, settings["pr_k"]),
                         **density_coverage(x, ref.features, settings["dc_k"])}.items():
                values[k].append(v)
    return {m: float(np.std(v, ddof=1)) for m, v in values.items()}


def calibration_lines(label: str, scored: list[dict], pooled: dict | None) -> list[str]:
    lines = []
    for m in METRICS:
        rep = summarise_repeats([s[m] for s in scored])
        se = float(np.mean([s[f"{m}_se"] for s in scored]))
        covered = sum(s[f"{m}_ci_low"] <= rep["mean"] <= s[f"{m}_ci_high"] for s in scored)
        sharp = pooled.get(m) if pooled else None
        lines.append(f"| {label} | {m} | {rep['mean']:.4g} | {rep['sd']:.3g} ({len(scored)}) | "
                     + (f"{sharp:.3g} | " if sharp else "| ") + f"{se:.3g} | {rep['sd'] / se:.2f} | "
                     + (f"{sharp / se:.2f} | " if sharp else "| ") + f"{covered}/{len(scored)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,1,2")
    p.add_argument("--slow-seeds", default="0-5", help="seeds of the rows at 64 steps (the slow ones)")
    p.add_argument("--regression-seeds", default="0-4", help="seeds of the rows at temperatures above 1")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--splits", type=int, default=5, help="random partitions of the pooled samples")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "bench" / "calibration"))
    p.add_argument("--sample-only", action="store_true", help="draw and cache features, score nothing")
    p.add_argument("--json", help="also write every seed's numbers to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids stalls on a shared machine)")
    p.add_argument("--config", default=None, help="protocol file (default: the project's bench.toml)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    seeds, slow, reg = parse_seeds(args.seeds), parse_seeds(args.slow_seeds), parse_seeds(args.regression_seeds)
    seeds_of = {r.slug(): (slow if r.steps == 64 else seeds) for r in ROWS}
    seeds_of.update({r.slug(): reg for r in REGRESSION_ROWS})

    cfg = load_config(args.config)
    run = run_settings(cfg, "digits", num_samples=args.num, progress=False)
    pipe = load_pipeline(run, [PlannedRow(r.slug(), r, r.sampler) for r in ROWS + REGRESSION_ROWS])
    feats = {}
    for settings in sorted(ROWS + REGRESSION_ROWS, key=lambda r: r.steps or 0):  # cheapest first
        for seed in seeds_of[settings.slug()]:
            feats[settings.slug(), seed] = features_for(pipe, settings, seed, args.num, cache)
    if args.sample_only:
        return
    real, _ = reference_features(pipe, progress=False)
    settings = run.metrics.as_dict()
    ref = Reference(real, settings)

    out = {}
    lines = ["| row | metric | mean | SD over seeds (seeds) | SD, pooled re-splits | mean SE of one seed | "
             "SD/SE | pooled SD/SE | seeds' intervals covering the mean |", "|---|---|---|---|---|---|---|---|---|"]
    sizes = sorted({args.num, min(300, args.num)}, reverse=True)
    for n in sizes:
        for r in ROWS:
            t0 = time.perf_counter()
            row_seeds = seeds_of[r.slug()]
            scored = [score(feats[r.slug(), s][:n], ref, settings, args.resamples) for s in row_seeds]
            pooled = None
            if len(row_seeds) >= POOLED_MIN_SEEDS:
                pool = np.concatenate([feats[r.slug(), s] for s in row_seeds])
                pooled = pooled_sd(pool, n, ref, settings, args.splits)
            out[f"{r.slug()}-n{n}"] = {"seeds": scored, "pooled_sd": pooled}
            print(f"scored {r.label()} N={n}: {len(scored)} seeds in {time.perf_counter() - t0:.0f} s", flush=True)
            lines += calibration_lines(f"{r.label()}, N={n}", scored, pooled)
    print(f"\nCalibration: {args.resamples} resamples, 95% intervals\n")
    print("\n".join(lines))

    threshold = getattr(cfg.thresholds.get("digits"), "fid_regression", None) or 0.25
    print(f"\nRegression check: every pair of seeds; significant: difference_test on FID, p < 0.05; "
          f"fails: significant and a rise above {threshold:.0%} (bench check's rule)\n")
    print("| row | N | pairs | significant, T=1 vs T=1 | fails, T=1 vs T=1 | mean FID rise | "
          "significant, T=1 vs T | fails, T=1 vs T | median p |")
    print("|---|---|---|---|---|---|---|---|---|")
    fails = lambda d, a: d["significant"] and d["delta"] > threshold * a["fid"]  # noqa: E731
    for n in sizes:
        for rt in REGRESSION_ROWS:
            r1 = SamplerSettings(rt.sampler, rt.steps, 1.0)
            base = out[f"{r1.slug()}-n{n}"]["seeds"]
            worse = [score(feats[rt.slug(), s][:n], ref, settings, args.resamples) for s in seeds_of[rt.slug()]]
            out[f"{rt.slug()}-n{n}"] = {"seeds": worse}
            same = [(difference_test(a, b, "fid"), a) for a, b in itertools.permutations(base, 2)]
            diff = [(difference_test(a, b, "fid"), a) for a in base for b in worse]
            rise = np.mean([b["fid"] for b in worse]) / np.mean([a["fid"] for a in base]) - 1
            print(f"| {rt.label()} | {n} | {len(same)} / {len(diff)} | "
                  f"{sum(d['significant'] for d, _ in same)} | {sum(fails(d, a) for d, a in same)} | {100 * rise:+.0f}% | "
                  f"{sum(d['significant'] for d, _ in diff)} | {sum(fails(d, a) for d, a in diff)} | "
                  f"{np.median([d['p_value'] for d, _ in diff]):.2g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
