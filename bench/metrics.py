"""Every metric from one pair of feature arrays: fake (generated) and real (reference).

Inputs are float64 numpy arrays (N, D); outputs are plain floats. FID, KID and precision/recall
are torch-fidelity 0.4.0's own functions (fake = its input1, real = its input2; KID of small sets
from one kernel matrix, to float64 rounding the same); density and
coverage follow Naeem et al. 2020 with the definitions of the `prdc` package, computed in chunks.

Nothing here holds an N x M distance matrix: distances are computed `chunk` rows at a time, so
beyond the features themselves memory is a few chunk x N float64 blocks (1024 x 50k: 0.4 GB each).
Measured peaks (maximum RSS above the features): precision/recall about 7 blocks, density/coverage
about 4, memorisation about 3; at 20k x 20k x 2048 all of them together rose 1.1 GB.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from .errors import BenchError

DEFAULT_SETTINGS = {"pr_k": 3, "dc_k": 5, "kid_subset_size": 1000, "kid_subsets": 100, "seed": 0,
                    "memorisation": False, "memorisation_quantile": 0.01}
CHUNK = 1024


def check_features(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise BenchError(f"{what} features must be a 2-D array (N, D), got shape {x.shape}")
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise BenchError(f"{what} features hold NaN or inf in {bad} of {len(x)} rows")
    return x


def check_pair(fake, real, min_samples: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    fake, real = check_features(fake, "fake"), check_features(real, "real")
    if fake.shape[1] != real.shape[1]:
        raise BenchError(f"fake and real features differ in dimension: {fake.shape[1]} vs {real.shape[1]}")
    if len(fake) < min_samples or len(real) < min_samples:
        raise BenchError(f"{metric} needs at least {min_samples} samples in each set, "
                         f"got {len(fake)} fake and {len(real)} real")
    return fake, real


def min_samples(settings: dict) -> int:
    """The fewest samples in each set that every metric of a row can be computed from."""
    s = {**DEFAULT_SETTINGS, **settings}
    return max(2, s["pr_k"] + 1, s["dc_k"] + 1)


# -----------------------------------------------------------------------------
# FID


def fid_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (mu (D,), sigma (D, D)): what a reference cache stores in place of its features."""
    features = check_features(features, "FID")
    if len(features) < 2:
        raise BenchError(f"FID statistics need at least 2 samples, got {len(features)}")
    stats = fid_features_to_statistics(torch.from_numpy(features))
    return stats["mu"], stats["sigma"]


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise BenchError(f"FID statistics do not fit together: mu {mu1.shape} and {mu2.shape}, "
                         f"sigma {sigma1.shape} and {sigma2.shape}; expected (D,) and (D, D)")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise BenchError(f"FID statistic {name} holds NaN or inf")
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    return float(out[KEY_METRIC_FID])


def fid(fake, real) -> float:
    fake, real = check_pair(fake, real, 2, "FID")
    return fid_from_stats(*fid_stats(fake), *fid_stats(real))


def cleanfid_cross_check(fake, real) -> dict:
    """FID from the same statistics twice: torch-fidelity's (trace of the matrix square root from the
    eigenvalues of sigma1 sigma2) and clean-fid's frechet_distance (scipy.linalg.sqrtm). Only clean-fid's
    formula is used, not its feature extractor, so nothing is downloaded.
    -> {"fid": torch-fidelity, "fid_cleanfid": clean-fid, "abs_diff": |difference|}"""
    try:
        from cleanfid.fid import frechet_distance
    except ImportError:
        raise BenchError("the clean-fid cross-check needs clean-fid: `pip install clean-fid`") from None
    fake, real = check_pair(fake, real, 2, "FID")
    mu1, sigma1 = fid_stats(fake)
    mu2, sigma2 = fid_stats(real)
    ours = fid_from_stats(mu1, sigma1, mu2, sigma2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes sqrtm's deprecated `disp`
        theirs = float(frechet_distance(mu1, sigma1, mu2, sigma2))
    return {"fid": ours, "fid_cleanfid": theirs, "abs_diff": abs(ours - theirs)}


# -----------------------------------------------------------------------------
# KID


def kid(fake, real, subset_size: int = 1000, subsets: int = 100, degree: int = 3, coef0: float = 1,
        seed: int = 0) -> dict:
    """Polynomial-kernel MMD^2 averaged over `subsets` random subsets (numpy RandomState(seed) draws
    them without replacement, fake then real for each subset). The subset size shrinks to the smaller
    set where that holds fewer than `subset_size` samples; kid_subset_size says which size was used.

    torch-fidelity's subsets and estimator. Where both sets together fit one kernel matrix
    (KID_ONE_KERNEL samples), the subsets' kernel sums are read off that matrix instead of
    recomputing three kernels per subset: 10-20x faster at digits' sizes, equal to torch-fidelity up to
    float64 summation order (tests/test_metrics.py)."""
    fake, real = check_pair(fake, real, 2, "KID")
    size = min(subset_size, len(fake), len(real))
    if len(fake) + len(real) <= KID_ONE_KERNEL:
        mmds = _kid_one_kernel(fake, real, size, subsets, degree, coef0, seed)
        return {"kid_mean": float(np.mean(mmds)), "kid_std": float(np.std(mmds)), "kid_subset_size": size}
    out = kid_features_to_metric(
        torch.from_numpy(fake), torch.from_numpy(real),
        kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly", kid_kernel_poly_degree=degree,
        kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=coef0, rng_seed=seed, verbose=False,
    )
    return {"kid_mean": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subset_size": size}


KID_ONE_KERNEL = 6000   # samples of both sets together: a float64 kernel matrix of at most 288 MB


def _kid_one_kernel(fake, real, size: int, subsets: int, degree: int, coef0: float, seed: int) -> np.ndarray:
    """The unbiased MMD^2 of each subset pair, as torch_fidelity.metric_kid.mmd2, from one kernel
    matrix of fake and real: with indicators a (the fake subset) and b (the real one), the sums of
    K_XX, K_YY and K_XY are a.K.a, b.K.b and a.K.b (less the diagonals for the first two)."""
    n = len(fake)
    both = np.concatenate([fake, real])
    # torch-fidelity's (X Y^T * gamma + coef0) ** degree, gamma = 1 / D, in place: one matrix in memory
    kernel = both @ both.T
    kernel *= 1.0 / both.shape[1]
    kernel += coef0
    kernel **= degree
    diagonal = np.diagonal(kernel)
    rng = np.random.RandomState(seed)
    mmds = []
    for start in range(0, subsets, 100):  # 100 subsets at a time: (N + M) x 200 indicators
        count = min(100, subsets - start)
        a, b = np.zeros((len(both), count)), np.zeros((len(both), count))
        for i in range(count):
            a[rng.choice(n, size, replace=False), i] = 1
            b[n + rng.choice(len(real), size, replace=False), i] = 1
        ka, kb = kernel @ a, kernel @ b
        xx = (a * ka).sum(0) - diagonal @ a
        yy = (b * kb).sum(0) - diagonal @ b
        xy = (b * ka).sum(0)
        mmds.append((xx + yy) / (size * (size - 1)) - 2 * xy / (size * size))
    return np.concatenate(mmds)


# -----------------------------------------------------------------------------
# precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020)


def precision_recall(fake, real, k: int = 3, chunk: int = CHUNK) -> dict:
    """torch-fidelity's improved precision and recall. It works `chunk` rows at a time; each step
    holds a chunk x N block of distances twice (pieces and their concatenation), and kthvalue adds
    a copy and an int64 index of the same size."""
    fake, real = check_pair(fake, real, k + 1, f"precision/recall with k={k}")
    precision, recall = calculate_precision_recall_part(torch.from_numpy(fake), torch.from_numpy(real),
                                                        neighborhood=k, batch_size=chunk)
    return {"precision": float(precision), "recall": float(recall)}


def distance_block(rows: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """torch.cdist(rows, y) filled `chunk` columns at a time: cdist's matmul path copies its whole
    second argument, which for y = 50k x 2048 features would be another 0.8 GB."""
    out = torch.empty(len(rows), len(y), dtype=torch.float64)
    for start in range(0, len(y), chunk):
        out[:, start:start + chunk] = torch.cdist(rows, y[start:start + chunk])
    return out


def kth_neighbour_distances(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the row itself is the 0-th)."""
    return torch.cat([distance_block(rows, x, chunk).kthvalue(k + 1, dim=1).values for rows in x.split(chunk)])


def nearest_distances(x: torch.Tensor, y: torch.Tensor, chunk: int, leave_one_out: bool = False) -> torch.Tensor:
    """Distance from each row of x to its nearest row of y; with leave_one_out (x is y), to its
    nearest other row, so a duplicated row has distance 0 and a unique one does not."""
    out = []
    for start in range(0, len(x), chunk):
        d = distance_block(x[start:start + chunk], y, chunk)
        if leave_one_out:
            i = torch.arange(len(d))
            d[i, start + i] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def density_coverage(fake, real, k: int = 5, chunk: int = CHUNK) -> dict:
    """As prdc.compute_prdc(real, fake, nearest_k=k): radius_i is the distance from real i to its k-th
    nearest real neighbour;
        density  = 1/(k M) sum_j sum_i 1[d(fake_j, real_i) < radius_i]   (M fake samples)
        coverage = fraction of real i whose nearest fake lies within radius_i (strictly).
    Distances are computed `chunk` rows at a time: memory is about chunk x len(real) x 8 bytes."""
    fake, real = check_pair(fake, real, k + 1, f"density/coverage with k={k}")
    fake_t, real_t = torch.from_numpy(fake), torch.from_numpy(real)
    radii = kth_neighbour_distances(real_t, k, chunk)
    inside = 0
    nearest_fake = torch.full((len(real),), float("inf"), dtype=torch.float64)
    for rows in fake_t.split(chunk):
        d = distance_block(rows, real_t, chunk)  # (chunk, len(real))
        inside += int((d < radii).sum())
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    density = inside / (k * len(fake))
    coverage = (nearest_fake < radii).double().mean().item()
    return {"density": float(density), "coverage": float(coverage)}


# -----------------------------------------------------------------------------
# memorisation


def memorisation(fake, train, quantile: float = 0.01, chunk: int = CHUNK) -> float:
    """Fraction of generated samples closer to some training sample than training samples
    typically are to each other:

        tau   = the `quantile` (default 1%) quantile of { min_{i' != i} d(train_i, train_i') }
        score = 1/M sum_j 1[ min_i d(fake_j, train_i) < tau ]          (M generated samples)

    A generator whose samples are new draws from the data distribution scores about `quantile`
    (a new draw is as near to the training set as a training sample left out of it); copies of
    training samples score 1. Each side is computed `chunk` rows at a time."""
    if not 0 < quantile < 1:
        raise BenchError(f"memorisation quantile must lie in (0, 1), got {quantile}")
    fake, train = check_pair(fake, train, 2, "memorisation")
    train_t = torch.from_numpy(train)
    leave_one_out = nearest_distances(train_t, train_t, chunk, leave_one_out=True).numpy()
    tau = np.quantile(leave_one_out, quantile)
    nearest_train = nearest_distances(torch.from_numpy(fake), train_t, chunk).numpy()
    return float((nearest_train < tau).mean())


# -----------------------------------------------------------------------------


def compute_metrics(fake, real, settings: dict | None = None) -> dict:
    """All metrics of one row. settings: pr_k, dc_k, kid_subset_size, kid_subsets, seed,
    memorisation (bool), memorisation_quantile (others ignored).
    -> fid, kid_mean, kid_std, kid_subset_size, precision, recall, density, coverage, and
    memorisation (real taken as the training set) where settings ask for it."""
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    fake, real = check_pair(fake, real, 2, "FID")
    out = {"fid": fid(fake, real)}
    out.update(kid(fake, real, subset_size=s["kid_subset_size"], subsets=s["kid_subsets"], seed=s["seed"]))
    out.update(precision_recall(fake, real, k=s["pr_k"]))
    out.update(density_coverage(fake, real, k=s["dc_k"]))
    if s["memorisation"]:
        out["memorisation"] = memorisation(fake, real, quantile=s["memorisation_quantile"])
    return out
