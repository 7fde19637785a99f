import numpy as np
import pytest
import scipy.linalg
import torch
from prdc import compute_prdc
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from bench import metrics
from bench.errors import BenchError


def gaussian(n, d, seed, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def closed_form_fid(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_closed_form_on_samples():
    x = gaussian(600, 8, 0)
    y = gaussian(500, 8, 1, shift=0.3) * 1.5
    assert metrics.fid(x, y) == pytest.approx(closed_form_fid(x, y), rel=1e-6)


def test_fid_from_stats_analytic_gaussians():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    assert metrics.fid_from_stats(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-12)


def test_fid_stats_roundtrip():
    x, y = gaussian(300, 6, 2), gaussian(200, 6, 3, shift=1.0)
    assert metrics.fid_from_stats(*metrics.fid_stats(x), *metrics.fid_stats(y)) == metrics.fid(x, y)


@pytest.mark.parametrize("n_fake, n_real, dim, subset, shift", [
    (300, 250, 16, 100, 0.2),
    (1000, 1297, 128, 1000, 0.0),   # digits' sizes: KID near 0, where cancellation is worst
    (80, 120, 4, 1000, 0.0),        # subset size shrinks to the smaller set
])
def test_kid_equals_torch_fidelity(n_fake, n_real, dim, subset, shift):
    """The one-kernel path: torch-fidelity's subsets and estimator, up to float64 summation order."""
    x, y = gaussian(n_fake, dim, 4), gaussian(n_real, dim, 5, shift=shift)
    out = metrics.kid(x, y, subset_size=subset, subsets=20, seed=7)
    size = min(subset, n_fake, n_real)
    ref = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subset_size=size,
                                 kid_subsets=20, rng_seed=7, verbose=False)
    assert out["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9, abs=1e-15)
    assert out["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    assert out["kid_subset_size"] == size


def test_kid_large_sets_are_torch_fidelity_itself(monkeypatch):
    monkeypatch.setattr(metrics, "KID_ONE_KERNEL", 100)
    x, y = gaussian(300, 16, 4), gaussian(250, 16, 5, shift=0.2)
    out = metrics.kid(x, y, subset_size=100, subsets=20, seed=7)
    ref = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subset_size=100,
                                 kid_subsets=20, rng_seed=7, verbose=False)
    assert out["kid_mean"] == ref["kernel_inception_distance_mean"]
    assert out["kid_std"] == ref["kernel_inception_distance_std"]


def test_kid_subset_size_adapts():
    x, y = gaussian(80, 4, 6), gaussian(120, 4, 7)
    out = metrics.kid(x, y, subset_size=1000, subsets=10)
    assert out["kid_subset_size"] == 80


def test_kid_zero_for_same_distribution_positive_for_shifted():
    x, y = gaussian(400, 8, 8), gaussian(400, 8, 9)
    same = metrics.kid(x, y, subset_size=200, subsets=50)
    assert abs(same["kid_mean"]) < 3 * same["kid_std"]
    shifted = metrics.kid(x, y + 1.0, subset_size=200, subsets=50)
    assert shifted["kid_mean"] > 3 * shifted["kid_std"] > 0


def test_precision_recall_equals_torch_fidelity_full():
    x, y = gaussian(300, 10, 10, shift=0.3), gaussian(400, 10, 11)
    for k in (1, 3, 5):
        out = metrics.precision_recall(x, y, k=k)
        p, r = calculate_precision_recall_full(torch.from_numpy(x), torch.from_numpy(y), neighborhood=k)
        assert (out["precision"], out["recall"]) == (p, r)
    # chunking does not change the answer
    assert metrics.precision_recall(x, y, k=3, chunk=64) == metrics.precision_recall(x, y, k=3)


def test_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # 1st-neighbour radius 1 everywhere
    fake = np.array([[0.5], [1.4], [10.0], [11.0]])  # radii 0.9, 0.9, 1, 1
    out = metrics.precision_recall(fake, real, k=1)
    assert out["precision"] == 0.5  # 0.5 and 1.4 lie in real balls; 10 and 11 do not
    assert out["recall"] == 0.75  # 0, 1, 2 lie in fake balls; 3 does not


def test_density_coverage_equal_prdc():
    x, y = gaussian(300, 10, 12, shift=0.2), gaussian(350, 10, 13)
    for k in (1, 3, 5):
        ref = compute_prdc(real_features=y, fake_features=x, nearest_k=k)
        out = metrics.density_coverage(x, y, k=k, chunk=97)
        assert out["density"] == pytest.approx(ref["density"], abs=1e-9)
        assert out["coverage"] == pytest.approx(ref["coverage"], abs=1e-9)


def test_compute_metrics_keys_and_defaults():
    x, y = gaussian(120, 6, 14), gaussian(150, 6, 15)
    out = metrics.compute_metrics(x, y, {"kid_subsets": 10})
    assert set(out) == {"fid", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall", "density", "coverage"}
    assert all(type(v) in (float, int) for v in out.values())
    assert out["kid_subset_size"] == 120
    assert out["fid"] == metrics.fid(x, y)
    assert out["density"] == metrics.density_coverage(x, y, k=5)["density"]


def test_guard_rails():
    x = gaussian(10, 4, 16)
    with pytest.raises(BenchError, match="at least 4 samples"):
        metrics.precision_recall(x[:3], x, k=3)
    with pytest.raises(BenchError, match="at least 6 samples"):
        metrics.density_coverage(x, x[:5], k=5)
    with pytest.raises(BenchError, match="at least 2 samples"):
        metrics.fid(x[:1], x)
    bad = x.copy()
    bad[[2, 5], 1] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(BenchError, match="3 of 10 rows"):
        metrics.fid(bad, x)
    with pytest.raises(BenchError, match="dimension: 4 vs 3"):
        metrics.compute_metrics(x, x[:, :3])
    with pytest.raises(BenchError, match="2-D"):
        metrics.kid(x.ravel(), x)
    with pytest.raises(BenchError, match="do not fit"):
        metrics.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_memorisation_by_hand():
    train = np.array([[0.0], [1.0], [3.0], [6.0]])  # leave-one-out nearest distances 1, 1, 2, 3
    fake = np.array([[0.5], [3.0], [10.0], [1.2], [8.0]])  # nearest-train distances 0.5, 0, 4, 0.2, 2
    assert metrics.memorisation(fake, train) == 3 / 5  # 1% quantile = 1: 0.5, 0 and 0.2 lie closer
    assert metrics.memorisation(fake, train, quantile=0.75) == 4 / 5  # 75%: 2.25, so 2 counts too
    assert metrics.memorisation(fake, train, chunk=2) == metrics.memorisation(fake, train)


def test_memorisation_copies_and_fresh_samples():
    train = gaussian(1500, 8, 17)
    assert metrics.memorisation(train[:200] + 1e-9, train) == 1.0
    fresh = metrics.memorisation(gaussian(1500, 8, 18), train, chunk=256)
    assert fresh < 0.04  # about the 1% of a training sample left out of the set
    with pytest.raises(BenchError, match="quantile"):
        metrics.memorisation(train, train, quantile=1.0)


def test_compute_metrics_memorisation_on_request():
    x, y = gaussian(60, 4, 19), gaussian(80, 4, 20)
    assert "memorisation" not in metrics.compute_metrics(x, y, {"kid_subsets": 5})
    out = metrics.compute_metrics(x, y, {"kid_subsets": 5, "memorisation": True})
    assert out["memorisation"] == metrics.memorisation(x, y)


def test_distances_in_blocks_equal_cdist():
    x, y = torch.from_numpy(gaussian(50, 5, 21)), torch.from_numpy(gaussian(70, 5, 22))
    torch.testing.assert_close(metrics.distance_block(x, y, 16), torch.cdist(x, y), rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics.nearest_distances(x, y, 16), torch.cdist(x, y).min(1).values)
    full = torch.cdist(x, x).fill_diagonal_(float("inf")).min(1).values
    torch.testing.assert_close(metrics.nearest_distances(x, x, 16, leave_one_out=True), full)


def test_cleanfid_cross_check():
    pytest.importorskip("cleanfid")
    x, y = gaussian(400, 16, 23), gaussian(300, 16, 24, shift=0.2)
    out = metrics.cleanfid_cross_check(x, y)
    assert out["fid"] == metrics.fid(x, y)
    assert out["fid_cleanfid"] == pytest.approx(out["fid"], rel=1e-6)
    assert out["abs_diff"] == abs(out["fid"] - out["fid_cleanfid"])
