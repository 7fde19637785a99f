"""bench.stats: the bootstrap's point estimates and weighted resamples against bench.metrics, its
chunked paths, its intervals against the seed-to-seed spread on Gaussian data, repeats and the
difference test."""
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from bench import metrics, stats
from bench.errors import BenchError

N, D = 240, 6
CHEAP_KID = {"kid_subsets": 2, "kid_subset_size": 100}


def gaussian(n, d, seed, scale=1.0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


@pytest.fixture(scope="module")
def pair():
    return gaussian(N, D, 0, 1.3, 0.3), gaussian(N, D, 1)


@pytest.fixture(scope="module")
def ref(pair):
    return stats.Reference(pair[1])


def explicit_recall(fake_drawn, fake_radii, real):
    """Recall with the generated samples' radii given (those of the full sample)."""
    d = torch.cdist(torch.from_numpy(real), torch.from_numpy(fake_drawn))
    return float((d <= torch.from_numpy(fake_radii)).any(1).double().mean())


def test_point_estimates_equal_bench_metrics(pair, ref):
    fake, real = pair
    r = stats.bootstrap_replicates(fake, ref, torch.ones(1, N))
    assert float(r["fid"][0]) == pytest.approx(metrics.fid(fake, real), rel=1e-10)
    # one subset of all N samples is all of them, in some order: the full-sample MMD^2
    assert float(r["kid_mean"][0]) == pytest.approx(metrics.kid(fake, real, subset_size=N, subsets=1)["kid_mean"],
                                                    rel=1e-9)
    pr, dc = metrics.precision_recall(fake, real, k=3), metrics.density_coverage(fake, real, k=5)
    for m, expected in {**pr, **dc}.items():
        assert float(r[m][0]) == pytest.approx(expected, abs=1e-6), m  # torch-fidelity's are float32


def test_weighted_resamples_equal_explicit_resamples(pair, ref):
    fake, real = pair
    counts = torch.cat([stats.resample_counts(N, 3, seed=5), stats.resample_counts(N, 1, seed=6, size=N // 2)])
    assert counts.sum(1).tolist() == [N, N, N, N // 2] and (counts == 0).any(1).all()
    r = stats.bootstrap_replicates(fake, ref, counts)
    radii = metrics.kth_neighbour_distances(torch.from_numpy(fake), 3, 1024).numpy()
    for b in range(4):
        drawn = np.repeat(np.arange(N), counts[b].long().numpy())
        x = fake[drawn]
        assert float(r["fid"][b]) == pytest.approx(metrics.fid(x, real), rel=1e-9)
        if len(x) == N:  # (torch-fidelity's MMD^2 wants subsets of equal size)
            kid = metrics.kid(x, real, subset_size=N, subsets=1)["kid_mean"]
            assert float(r["kid_mean"][b]) == pytest.approx(kid, rel=1e-9)
        assert float(r["precision"][b]) == pytest.approx(metrics.precision_recall(x, real)["precision"], abs=1e-6)
        assert float(r["recall"][b]) == pytest.approx(explicit_recall(fake[np.unique(drawn)], radii[np.unique(drawn)],
                                                                      real), abs=1e-12)
        dc = metrics.density_coverage(x, real)
        assert float(r["density"][b]) == pytest.approx(dc["density"], abs=1e-12)
        assert float(r["coverage"][b]) == pytest.approx(dc["coverage"], abs=1e-12)


def test_chunked_paths_equal_unchunked(pair, ref, monkeypatch):
    fake, real = pair
    weights = torch.cat([torch.ones(1, N), stats.resample_counts(N, 5, seed=2)])
    whole, whole_var = stats._replicates(fake, ref, weights)
    small = stats.Reference(real, chunk=7)
    for name in ("radius_pr", "radius_dc", "sqrt_sigma"):
        assert torch.allclose(getattr(small, name), getattr(ref, name), rtol=1e-12, atol=1e-12), name
    assert float(small.kernel_offdiag) == pytest.approx(float(ref.kernel_offdiag), rel=1e-12)
    monkeypatch.setattr(stats, "BLOCK_ELEMENTS", 64)  # FID: 10 rows at a time, one resample per batch
    chunked, chunked_var = stats._replicates(fake, small, weights)
    for m in stats.METRICS:
        assert torch.allclose(chunked[m], whole[m], rtol=1e-10, atol=1e-12), m
    assert chunked_var == pytest.approx(whole_var, rel=1e-12)


def test_intervals_match_the_seed_to_seed_spread_on_gaussians():
    """60 independent samples of one distribution against one fixed reference: each sample's
    interval should cover the expectation at this N (the mean over the samples) about 95% of the
    time, and the mean standard error should match the SD over samples. Fixed seeds: deterministic."""
    real = gaussian(400, 5, 0)
    ref = stats.Reference(real)
    samples = [gaussian(150, 5, 100 + s, 1.4, 0.4) for s in range(60)]
    out = [{**stats.bootstrap_intervals(x, ref, CHEAP_KID, resamples=200, seed=s),
            "fid": metrics.fid(x, real), **metrics.density_coverage(x, real),
            **metrics.precision_recall(x, real)} for s, x in enumerate(samples)]
    for m, (lo_ratio, hi_ratio) in {"fid": (0.8, 1.25), "precision": (0.8, 1.25), "density": (0.8, 1.3),
                                    "coverage": (0.8, 1.3), "recall": (0.7, 1.5)}.items():
        values = np.array([o[m] for o in out])
        expectation, sd = values.mean(), values.std(ddof=1)
        se = np.mean([o[f"{m}_se"] for o in out])
        covered = np.mean([o[f"{m}_ci_low"] <= expectation <= o[f"{m}_ci_high"] for o in out])
        assert lo_ratio <= se / sd <= hi_ratio, (m, se, sd)
        assert covered >= 0.85, (m, covered)
    # the raw bootstrap of coverage cannot cover what no observed sample covers: too narrow here
    boot = np.mean([stats.bootstrap_replicates(x, ref, stats.resample_counts(150, 100, s))["coverage"].std()
                    for s, x in enumerate(samples[:20])])
    assert boot < 0.8 * np.std([o["coverage"] for o in out], ddof=1)


def test_fid_interval_is_centred_on_the_point_estimate(pair, ref):
    """The raw replicates sit above the point estimate (duplicates); the interval does not."""
    fake, _ = pair
    r = stats.bootstrap_replicates(fake, ref, stats.resample_counts(N, 300, seed=0))["fid"]
    out = stats.bootstrap_intervals(fake, ref, CHEAP_KID, resamples=300, seed=0)
    point = metrics.fid(fake, pair[1])
    assert float(r.mean()) - point > 0.25 * out["fid_se"]  # the raw replicates' bias
    assert out["fid_ci_low"] < point < out["fid_ci_high"]
    assert abs((out["fid_ci_low"] + out["fid_ci_high"]) / 2 - point) < 0.3 * out["fid_se"]
    assert out["fid_se"] == pytest.approx(float(r.std()), rel=1e-9)


def test_intervals_use_the_given_point_and_are_reproducible(pair, ref):
    fake, _ = pair
    point = {m: 1.0 for m in stats.METRICS}
    a = stats.bootstrap_intervals(fake, ref, resamples=50, seed=3, point=point)
    assert set(a) == {f"{m}_{s}" for m in stats.METRICS for s in ("ci_low", "ci_high", "se")}
    assert all(a[f"{m}_ci_low"] < 1.0 < a[f"{m}_ci_high"] for m in stats.METRICS)
    assert stats.bootstrap_intervals(fake, ref, resamples=50, seed=3, point=point) == a
    assert stats.bootstrap_intervals(fake, ref, resamples=50, seed=4, point=point) != a


def test_covering_set_variance_by_hand():
    # signatures (3 labels, size): reference samples 0 and 1 covered by the same single sample,
    # 2 by two samples, 3 by none: pairs (0,0) (0,1) (1,0) (1,1) give +4, (2,2) gives -1, f1 = 2
    sig = torch.tensor([[5.0, 6, 7, 1], [5, 6, 7, 1], [9, 9, 9, 2], [0, 0, 0, 0]], dtype=torch.float64)
    assert stats.covering_set_variance(sig, n=10) == pytest.approx((4 - 1 - 2 ** 2 / 10) / 16)


# ----------------------------------------------------------------------------- repeats and the test


def test_summarise_repeats():
    out = stats.summarise_repeats([1.0, 2.0, 3.0])
    half = scipy_stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert out.pop("values") == [1.0, 2.0, 3.0]
    assert out == pytest.approx({"mean": 2.0, "sd": 1.0, "n": 3, "ci_low": 2 - half, "ci_high": 2 + half})
    assert stats.summarise_repeats([4.5]) == {"mean": 4.5, "sd": None, "n": 1, "ci_low": None, "ci_high": None,
                                              "values": [4.5]}
    with pytest.raises(BenchError, match="no repeated values"):
        stats.summarise_repeats([])
    with pytest.raises(BenchError, match="finite"):
        stats.summarise_repeats([1.0, float("nan")])


@dataclass
class Row:
    fid: float
    fid_ci_low: float | None = None
    fid_ci_high: float | None = None
    fid_se: float | None = None
    fid_sd: float | None = None
    n_seeds: int | None = None


def test_difference_test_p_values():
    a = {"fid": 10.0, "fid_se": 1.0}
    same = stats.difference_test(a, dict(a))
    assert same["p_value"] == 1.0 and same["delta"] == 0.0 and not same["significant"]
    b = {"fid": 12.0, "fid_se": 1.0}
    out = stats.difference_test(a, b)
    z = scipy_stats.norm.ppf(0.975)
    assert out["p_value"] == pytest.approx(2 * scipy_stats.norm.sf(2 / math.sqrt(2)), rel=1e-12)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((2 - z * math.sqrt(2), 2 + z * math.sqrt(2)))
    assert not out["significant"]
    back = stats.difference_test(b, a)
    assert back["delta"] == -out["delta"] and back["p_value"] == out["p_value"]
    far = stats.difference_test(a, {"fid": 30.0, "fid_se": 1.5})
    assert far["p_value"] < 1e-10 and far["significant"]
    # from intervals alone (rows storing only <m>_ci_low / _ci_high), dataclass rows too
    from_ci = stats.difference_test(Row(10.0, 10 - z, 10 + z), Row(12.0, 12 - z, 12 + z))
    assert from_ci["p_value"] == pytest.approx(out["p_value"], rel=1e-9)


def test_difference_test_with_repeats_is_a_welch_t_test():
    a = Row(10.0, fid_sd=1.5, n_seeds=3)
    b = {"fid": 14.0, "fid_se": 0.5}
    out = stats.difference_test(a, b)
    var_a, var_b = 1.5 ** 2 / 3, 0.25
    df = (var_a + var_b) ** 2 / (var_a ** 2 / 2)
    assert out["df"] == pytest.approx(df)
    assert out["p_value"] == pytest.approx(2 * scipy_stats.t.sf(4 / math.sqrt(var_a + var_b), df), rel=1e-9)
    # the t interval of 3 repeats gives the same standard error as their SD
    half = scipy_stats.t.ppf(0.975, 2) * 1.5 / math.sqrt(3)
    from_ci = stats.difference_test(Row(10.0, 10 - half, 10 + half, n_seeds=3), b)
    assert from_ci["p_value"] == pytest.approx(out["p_value"], rel=1e-9)
    with pytest.raises(BenchError, match="no standard error"):
        stats.difference_test({"fid": 1.0}, b)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused(pair, ref):
    fake, real = pair
    bad = fake.copy()
    bad[3, 2] = np.nan
    with pytest.raises(BenchError, match="NaN"):
        stats.bootstrap_intervals(bad, ref, resamples=50)
    with pytest.raises(BenchError, match="at least 4 generated samples"):
        stats.bootstrap_intervals(fake[:3], ref, resamples=50)
    with pytest.raises(BenchError, match="at least 6 reference samples"):
        stats.Reference(real[:5])
    with pytest.raises(BenchError, match="dimension"):
        stats.bootstrap_intervals(fake[:, :4], ref, resamples=50)
    with pytest.raises(BenchError, match="too few"):
        stats.bootstrap_intervals(fake, ref, resamples=10)
    with pytest.raises(BenchError, match="level"):
        stats.bootstrap_intervals(fake, ref, level=1.5)
    with pytest.raises(BenchError, match="pr_k"):
        stats.bootstrap_intervals(fake, ref, {"pr_k": 5}, resamples=50)
    with pytest.raises(BenchError, match="whole counts"):
        stats.bootstrap_replicates(fake, ref, torch.full((2, N), 0.5))


@pytest.mark.slow
def test_calibration_script_runs_and_keys_its_cache_by_the_checkpoints(workdir):
    """scripts/calibrate_intervals.py end to end at a tiny size: its tables, and a feature cache that a
    second call reuses and whose names carry the hashes of the checkpoints that made the features."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "scripts" / "calibrate_intervals.py"
    cmd = [sys.executable, str(script), "--seeds", "0,1", "--slow-seeds", "0,1", "--regression-seeds", "0",
           "--num", "12", "--resamples", "40", "--cache", str(workdir / "calib"), "--config", str(workdir / "bench.toml"),
           "--json", str(workdir / "calib.json")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| absorbing, 64 steps, t=1, N=12 | fid |" in first.stdout and "| autoregressive, t=2 | 12 |" in first.stdout
    assert first.stdout.count("sampled ") == 3 * 2 + 5
    names = sorted(p.name for p in (workdir / "calib").iterdir())
    assert len(names) == 11 and all(re.fullmatch(r"[a-z0-9.-]+-seed\d-n12-[0-9a-f]{16}\.npy", n) for n in names)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0 and "sampled " not in again.stdout
    damaged = workdir / "calib" / names[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # a truncated cache file is drawn again, alone
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.count("sampled ") == 1 and len(np.load(damaged)) == 12
    assert not [p for p in (workdir / "calib").iterdir() if p.suffix != ".npy"]  # no temporary files left
    seeds = json.loads((workdir / "calib.json").read_text())["absorbing-s8-t1-n12"]["seeds"]
    assert len(seeds) == 2 and all(0 <= s["fid_ci_low"] < s["fid_ci_high"] for s in seeds)


def test_holm_adjustment():
    # the textbook case: sorted p 0.01, 0.02, 0.03, 0.04 of m = 4 -> 0.04, 0.06, 0.06, 0.06 (monotone)
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == [] and stats.holm([0.2]) == [0.2]
    with pytest.raises(BenchError, match="p-values"):
        stats.holm([1.5])
    # family-wise error: 10 independent null p-values, any "significant" in about 5% of families,
    # where comparing each raw p with 0.05 errs in 1 - 0.95^10 = 40%
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(20000, 10))
    raw = (p < 0.05).any(1).mean()
    adjusted = np.mean([min(stats.holm(row)) < 0.05 for row in p[:4000]])
    assert 0.37 < raw < 0.43 and 0.035 < adjusted < 0.06
