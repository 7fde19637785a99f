"""Is one seed's bootstrap interval honest? On digits, for absorbing at 8 and 64 steps and
autoregressive (N = 1000, temperature 1), several seeds each: every seed's metrics and bootstrap
intervals, then the seed-to-seed SD of each metric against the mean bootstrap SE, and how often a
seed's interval covers the mean over seeds. Because sample i depends only on (seed, i), the first
300 samples of a seed are exactly what the CI profile (N = 300) draws, so N = 300 is reported too.
A regression section draws the same samplers at temperature 1.3 and applies `difference_test`
to every (T = 1.0 seed, T = 1.3 seed) pair and every pair of T = 1.0 seeds.

    python scripts/calibrate_intervals.py                     # sampling: about 15 minutes on 2 free cores
    python scripts/calibrate_intervals.py --seeds 0-4 --slow-seeds 0-4 --resamples 200

Features are cached in --cache (one .npy per sampler row and seed), so a second call only scores.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.config import load_config  # noqa: E402
from bench.metrics import compute_metrics  # noqa: E402
from bench.protocol import load_pipeline, reference_features  # noqa: E402
from bench.samplers import SamplerSettings, generate  # noqa: E402
from bench.stats import METRICS, Reference, bootstrap_intervals, difference_test, summarise_repeats  # noqa: E402

ROWS = [SamplerSettings("absorbing", 8, 1.0), SamplerSettings("absorbing", 64, 1.0),
        SamplerSettings("autoregressive", None, 1.0)]
REGRESSION_ROWS = [SamplerSettings("absorbing", 64, 1.3), SamplerSettings("autoregressive", None, 1.3)]


def parse_seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def features_for(pipe, settings: SamplerSettings, seed: int, n: int, cache: Path) -> np.ndarray:
    path = cache / f"{settings.slug()}-seed{seed}-n{n}.npy"
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    tokens = generate(pipe.make_sampler(settings.sampler), settings, seed, range(n), 250, pipe.device, progress=False)
    feats = np.concatenate([pipe.extractor(pipe.decode(tokens[i:i + 250])) for i in range(0, n, 250)])
    np.save(path, feats)
    print(f"  sampled {settings.label()} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return feats


def score(feats: np.ndarray, ref: Reference, settings: dict, resamples: int) -> dict:
    point = compute_metrics(feats, ref.features, settings)
    return {**point, **bootstrap_intervals(feats, ref, settings, resamples=resamples, point=point)}


def calibration_table(label: str, scored: list[dict]) -> list[str]:
    lines = []
    for m in METRICS:
        values = [s[m] for s in scored]
        rep = summarise_repeats(values)
        se = float(np.mean([s[f"{m}_se"] for s in scored]))
        covered = sum(s[f"{m}_ci_low"] <= rep["mean"] <= s[f"{m}_ci_high"] for s in scored)
        lines.append(f"| {label} | {m} | {rep['mean']:.4g} | {rep['sd']:.4g} | {se:.4g} | "
                     f"{rep['sd'] / se:.2f} | {covered}/{len(scored)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,1,2")
    p.add_argument("--slow-seeds", default="0-5", help="seeds of the rows at 64 steps (the slow ones)")
    p.add_argument("--regression-seeds", default="0-4", help="seeds of the rows at temperature 1.3")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "bench" / "calibration"))
    p.add_argument("--sample-only", action="store_true", help="draw and cache features, score nothing")
    p.add_argument("--json", help="also write every seed's numbers to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids stalls on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    seeds, slow, reg = parse_seeds(args.seeds), parse_seeds(args.slow_seeds), parse_seeds(args.regression_seeds)
    seeds_of = {r.slug(): (slow if r.steps == 64 else seeds) for r in ROWS}
    seeds_of.update({r.slug(): reg for r in REGRESSION_ROWS})

    cfg = load_config()
    ds = cfg.dataset("digits")
    pipe = load_pipeline(cfg, ds, "cpu", sorted({r.sampler for r in ROWS + REGRESSION_ROWS}))
    feats = {}
    for settings in sorted(ROWS + REGRESSION_ROWS, key=lambda r: r.steps or 0):  # cheapest first
        for seed in seeds_of[settings.slug()]:
            feats[settings.slug(), seed] = features_for(pipe, settings, seed, args.num, cache)
    if args.sample_only:
        return
    real, _ = reference_features(pipe, progress=False)
    settings = {**cfg.metrics, **ds.metrics}
    ref = Reference(real, settings)

    out = {}
    lines = ["| row | metric | mean over seeds | SD over seeds | mean bootstrap SE | SD / SE | seeds covering the mean |",
           "|---|---|---|---|---|---|---|"]
    for n in (args.num, 300):
        for r in ROWS:
            t0 = time.perf_counter()
            scored = [score(feats[r.slug(), s][:n], ref, settings, args.resamples) for s in seeds_of[r.slug()]]
            out[f"{r.slug()}-n{n}"] = scored
            print(f"scored {r.label()} N={n}: {len(scored)} seeds in {time.perf_counter() - t0:.0f} s", flush=True)
            lines += calibration_table(f"{r.label()}, N={n}", scored)
    print(f"\nCalibration: {args.resamples} resamples, 95% intervals\n")
    print("\n".join(lines))

    print("\nRegression test: difference_test on FID, every pair of seeds (significant at p < 0.05)\n")
    print("| row | N | pairs | T=1.0 vs T=1.0 significant | T=1.0 vs T=1.3 significant | median FID rise at T=1.3 |")
    print("|---|---|---|---|---|---|")
    for n in (args.num, 300):
        for r13 in REGRESSION_ROWS:
            r10 = SamplerSettings(r13.sampler, r13.steps, 1.0)
            base = out[f"{r10.slug()}-n{n}"]
            worse = [score(feats[r13.slug(), s][:n], ref, settings, args.resamples) for s in seeds_of[r13.slug()]]
            out[f"{r13.slug()}-n{n}"] = worse
            same = [difference_test(a, b, "fid") for a, b in itertools.combinations(base, 2)]
            diff = [difference_test(a, b, "fid") for a in base for b in worse]
            rise = np.median([b["fid"] / a["fid"] - 1 for a in base for b in worse])
            print(f"| {r13.sampler}{f' {r13.steps} steps' if r13.steps else ''} | {n} | {len(same)} / {len(diff)} | "
                  f"{sum(d['significant'] for d in same)}/{len(same)} | {sum(d['significant'] for d in diff)}/{len(diff)} | "
                  f"{100 * rise:+.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
