"""How sure a metric is: intervals from one sample, summaries of repeated seeds, and a test on the
difference between two runs.

`bootstrap_intervals` resamples the generated samples with replacement (multinomial counts, one row
of weights per resample) against the fixed reference, and recomputes every metric from the weights
rather than from copied features:
- FID: weighted mean and covariance in float64; the trace term tr sqrt(S_b S_ref) is
  sum sqrt(eigvalsh(R S_b R)), R = sqrt(S_ref) computed once per reference (`Reference`).
- KID: the unbiased polynomial-kernel MMD^2 of all generated against all reference samples, from
  kernel sums: sum_ij c_i c_j k(x_i, x_j) in chunk x chunk blocks (never N x N), and each sample's
  kernel sum over the reference, once. Pairs of distinct draws count, copies of one sample included.
- precision, density: each sample's indicator or count against the reference balls, weighted.
- coverage, recall: a reference sample counts where some drawn (count > 0) sample covers it (lies
  in its ball; for recall: holds it in the sample's own ball, radii kept from the full sample).
  These replicates are only a fallback: a resample cannot cover a reference sample that none of
  the observed samples covers, so part of the seed-to-seed variance is missing, and on Gaussian
  data the replicates' SD was off by 0.5-2.3x (coverage: 1.2-1.6x too small at coverage 0.3-0.6).
  The standard error comes from `covering_set_variance` instead, the interval is point +- z SE.
The first row of weights is all ones, so the point estimates come out of the same code; they equal
bench.metrics' (tests/test_stats.py).

Interval: the percentile interval of the replicates re-centred on the point estimate,
[point + q_lo(r - mean r), point + q_hi(r - mean r)]; standard error: the replicates' SD. The raw
replicates are biased: a resample holds only about 63% distinct samples, so FID and KID replicates
sit above the point estimate (at digits' N = 1000 by several SEs). What varies
from seed to seed is the point estimate around its expectation at this N, and the spread of the
replicates about their own mean estimates exactly that. The basic bootstrap would shift the interval
down by the bootstrap bias and so aim at the infinite-N value, which no row measures; BCa needs a
jackknife (N more evaluations) for a skewness that is small here (FID replicates: 0.1-0.8).

Calibration (scripts/calibrate_intervals.py, digits, N = 1000 and 300): against the seed-to-seed SD
of seeds pooled and re-split, the mean SE of one seed is for FID 0.9-1.4x as large (most for the
autoregressive row, whose FID is smallest: the bootstrap over-counts the second-order part of FID's
variance, three times over for ||mu_f - mu_r||^2), for KID about 1.1-1.9x (against seeds), for
precision, recall, density and coverage 0.85-1.35x. So the intervals are honest, and conservative
for FID and KID where FID is small.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from scipy import stats as scipy_stats

from .errors import BenchError
from .metrics import CHUNK, DEFAULT_SETTINGS, check_features, kid

METRICS = ("fid", "kid_mean", "precision", "recall", "density", "coverage")
DEFAULT_RESAMPLES = 500
# KID's kernel, as bench.metrics.kid: (x.y / D + 1)^3
KID_DEGREE, KID_COEF0 = 3, 1.0
# Temporary blocks of the weighted covariances stay below this many float64 elements (64 MB).
BLOCK_ELEMENTS = 2 ** 23


def bootstrap_method(resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """What a run records in its manifest about its intervals."""
    return {"method": "bootstrap over the generated samples (multinomial weights), reference fixed",
            "interval": "percentile of the replicates re-centred on the point estimate",
            "resamples": resamples, "seed": seed, "level": level,
            "kid": "replicates of the unbiased MMD^2 of all samples (kid_mean itself averages subsets)",
            "coverage_recall": "point +- z SE, SE from the covering sets (bench.stats.covering_set_variance; "
                               "recall's radii held fixed); the bootstrap where that variance is <= 0"}


class Reference:
    """What every row's bootstrap needs of the reference features, computed once: mean, covariance,
    its symmetric square root and trace, the k-NN radii (pr_k and dc_k, squared) and the kernel sum
    over distinct reference pairs. Build one per run and pass it to bootstrap_intervals per row."""

    def __init__(self, real, settings: dict | None = None, device="cpu", chunk: int = CHUNK):
        s = {**DEFAULT_SETTINGS, **(settings or {})}
        self.features = check_features(real, "real")
        self.pr_k, self.dc_k = int(s["pr_k"]), int(s["dc_k"])
        self.settings, self.device, self.chunk = s, torch.device(device), chunk
        m, d = self.features.shape
        k = max(self.pr_k, self.dc_k)
        if m < k + 1:
            raise BenchError(f"the bootstrap needs at least {k + 1} reference samples (k = {k}), got {m}")
        y = torch.from_numpy(self.features).to(self.device)
        self.y, self.sq = y, (y * y).sum(1)
        self.mu = y.mean(0)
        sigma = torch.cov(y.T).reshape(d, d)
        vals, vecs = torch.linalg.eigh(sigma)
        self.sqrt_sigma = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
        self.trace = sigma.diagonal().sum()
        nearest, kernel_sum = _self_pass(y, self.sq, k, chunk)
        self.radius_pr, self.radius_dc = nearest[:, self.pr_k], nearest[:, self.dc_k]
        self.kernel_offdiag = kernel_sum - _kernel_diag(self.sq, d).sum()


def _kernel(gram: torch.Tensor, dim: int) -> torch.Tensor:
    return (gram / dim + KID_COEF0) ** KID_DEGREE


def _kernel_diag(sq: torch.Tensor, dim: int) -> torch.Tensor:
    return (sq / dim + KID_COEF0) ** KID_DEGREE


def _squared_distances(gram: torch.Tensor, sq_rows: torch.Tensor, sq_cols: torch.Tensor) -> torch.Tensor:
    return (sq_rows[:, None] + sq_cols[None, :] - 2 * gram).clamp_(min=0)


def _self_pass(x: torch.Tensor, sq: torch.Tensor, k: int, chunk: int,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the chunk x chunk blocks of x against itself (the upper triangle of blocks).
    -> (the k + 1 smallest squared distances of each row, self included, ascending (n, k + 1);
    sum_ij w_i w_j k(x_i, x_j) for each row of weights (R,), or the plain kernel sum without weights)."""
    n, d = x.shape
    nearest = torch.full((n, k + 1), float("inf"), dtype=x.dtype, device=x.device)
    w = torch.ones(1, n, dtype=x.dtype, device=x.device) if weights is None else weights
    total = torch.zeros(len(w), dtype=x.dtype, device=x.device)
    starts = range(0, n, chunk)
    for a in starts:
        xa, wa = x[a:a + chunk], w[:, a:a + chunk].to(x.dtype)
        for b in starts:
            if b < a:
                continue
            gram = xa @ x[b:b + chunk].T
            dist = _squared_distances(gram, sq[a:a + chunk], sq[b:b + chunk])
            if a == b:
                dist.fill_diagonal_(0)
            nearest[a:a + chunk] = torch.cat([nearest[a:a + chunk], dist], 1).topk(k + 1, 1, largest=False).values
            part = ((wa @ _kernel(gram, d)) * w[:, b:b + chunk].to(x.dtype)).sum(1)
            if b > a:  # the block below the diagonal is this one transposed
                nearest[b:b + chunk] = torch.cat([nearest[b:b + chunk], dist.T], 1).topk(k + 1, 1, largest=False).values
                part = 2 * part
            total += part
    total = total if weights is not None else total[0]
    return nearest, total


def resample_counts(n: int, resamples: int, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """(resamples, n) float32 multinomial counts: how often each of n generated samples is drawn in
    each resample of `size` draws (default n). Drawn on the CPU, so the same on every device."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(resamples, n, dtype=torch.float32)
    for b in range(resamples):
        out[b] = torch.bincount(torch.randint(n, (size or n,), generator=g), minlength=n)
    return out


def bootstrap_replicates(fake, ref: Reference, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of METRICS (kid_mean as the full-sample unbiased MMD^2) for each row of weights
    (R, N): how often each generated sample is drawn (a row of ones is the sample itself; rows may
    draw fewer or more than N).
    -> metric -> float64 tensor (R,) on the reference's device."""
    return _replicates(fake, ref, weights)[0]


def _replicates(fake, ref: Reference, weights: torch.Tensor) -> tuple[dict, dict]:
    """(bootstrap_replicates, the variances of coverage and recall by covering_set_variance: of
    the whole sample, whatever the weights)."""
    x = torch.as_tensor(check_features(fake, "fake")).to(ref.device)
    n, d = x.shape
    if d != ref.y.shape[1]:
        raise BenchError(f"fake and real features differ in dimension: {d} vs {ref.y.shape[1]}")
    if n < ref.pr_k + 1:
        raise BenchError(f"the bootstrap needs at least {ref.pr_k + 1} generated samples (pr_k = {ref.pr_k}), got {n}")
    weights = torch.as_tensor(weights, dtype=torch.float32, device=ref.device)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise BenchError(f"bootstrap weights must be (resamples, {n}), got {tuple(weights.shape)}")
    size = weights.double().sum(1)  # each resample's sample size
    if (weights < 0).any() or (weights != weights.round()).any() or (size < 2).any():
        raise BenchError("bootstrap weights must be non-negative whole counts, at least 2 in each row")
    chunk, m = ref.chunk, len(ref.y)
    sq = (x * x).sum(1)
    out = {"fid": _fid(x, weights, ref, size)}

    nearest, kernel_ff = _self_pass(x, sq, ref.pr_k, chunk, weights)
    radius_fake = nearest[:, ref.pr_k]
    w64 = weights.double()
    kernel_ff = (kernel_ff - w64 @ _kernel_diag(sq, d)) / (size * (size - 1))

    inside_pr = torch.zeros(n, dtype=torch.bool, device=ref.device)
    inside_dc = torch.zeros(n, dtype=torch.float64, device=ref.device)
    kernel_fr = torch.zeros(n, dtype=torch.float64, device=ref.device)
    covered = torch.zeros(len(weights), dtype=torch.float64, device=ref.device)
    recalled = torch.zeros(len(weights), dtype=torch.float64, device=ref.device)
    drawn = (weights > 0).float()
    # Random integers below 2^20 summed in float64 stay exact in any order: equal sets of covering
    # samples give equal signatures (different ones collide with probability ~2^-60).
    labels = torch.randint(2 ** 20, (n, 3), generator=torch.Generator().manual_seed(0)).double().to(ref.device)
    signatures = {k: torch.zeros(m, 4, dtype=torch.float64, device=ref.device) for k in ("coverage", "recall")}
    for b in range(0, m, chunk):
        y, rad_pr, rad_dc = ref.y[b:b + chunk], ref.radius_pr[b:b + chunk], ref.radius_dc[b:b + chunk]
        hits_cov = torch.zeros(len(y), len(weights), device=ref.device)
        hits_rec = torch.zeros(len(y), len(weights), device=ref.device)
        for a in range(0, n, chunk):
            gram = x[a:a + chunk] @ y.T
            dist = _squared_distances(gram, sq[a:a + chunk], ref.sq[b:b + chunk])
            kernel_fr[a:a + chunk] += _kernel(gram, d).sum(1)
            inside_pr[a:a + chunk] |= (dist <= rad_pr).any(1)
            in_dc = dist < rad_dc
            inside_dc[a:a + chunk] += in_dc.sum(1)
            # precision's and recall's radii are compared with <=, density's and coverage's with <,
            # as torch-fidelity and prdc do
            in_rec = dist <= radius_fake[a:a + chunk, None]
            hits_cov += in_dc.float().T @ drawn[:, a:a + chunk].T
            hits_rec += in_rec.float().T @ drawn[:, a:a + chunk].T
            for key, inside in (("coverage", in_dc), ("recall", in_rec)):
                signatures[key][b:b + chunk, :3] += inside.double().T @ labels[a:a + chunk]
                signatures[key][b:b + chunk, 3] += inside.sum(0)
        covered += (hits_cov > 0).sum(0)
        recalled += (hits_rec > 0).sum(0)
    out["kid_mean"] = kernel_ff + ref.kernel_offdiag / (m * (m - 1)) - 2 * (w64 @ kernel_fr) / (size * m)
    out["precision"] = (w64 @ inside_pr.double()) / size
    out["recall"] = recalled / m
    out["density"] = (w64 @ inside_dc) / (ref.dc_k * size)
    out["coverage"] = covered / m
    return out, {key: covering_set_variance(sig, n) for key, sig in signatures.items()}


def covering_set_variance(signatures: torch.Tensor, n: int) -> float:
    """Variance of coverage or recall (the fraction of reference samples covered by some generated
    sample) from one sample of n generated samples.

    Z_i = 1[S_i is not empty], S_i the generated samples covering reference sample i (coverage: in
    its ball; recall: holding it in theirs, radii treated as fixed). Were the generated samples a
    Poisson process (every ball a small share of the mass), counts in disjoint regions would be
    independent Poisson, and P(count = 0) = e^-L, E[(-1)^count] = e^-2L give
        Cov(Z_i, Z_j) = e^-L(Bi u Bj) - e^-L(Bi) e^-L(Bj),   estimated without bias by
                        1[S_i = S_j, not empty] (-1)^(|S_i| + 1).
    A fixed sample size n adds -P(|S_i| = 1) P(|S_j| = 1) / n to every pair (estimated with f1,
    the number of reference samples covered exactly once). So
        Var(mean Z) = (sum over pairs with the same non-empty set of (-1)^(|S| + 1) - f1^2 / n) / M^2
    (i = j included), which can come out <= 0 by chance where the true variance is small (recall
    near 1). For recall it leaves out the variance of the radii themselves: on Gaussian data its
    SD came out 0.95-1.4x too small, least so where recall is high.
    signatures: (M, 4) a set signature per reference sample, the last column the set's size."""
    groups, sizes = torch.unique(signatures, dim=0, return_counts=True)
    nonempty = groups[:, 3] > 0
    sign = 1 - 2 * (groups[nonempty, 3].long() % 2 == 0).double()
    once = float((signatures[:, 3] == 1).sum())
    return (float((sign * sizes[nonempty].double() ** 2).sum()) - once ** 2 / n) / len(signatures) ** 2


def _fid(x: torch.Tensor, weights: torch.Tensor, ref: Reference, size: torch.Tensor) -> torch.Tensor:
    """FID of each weighted sample (weights (R, N) of sample sizes `size` (R,)): mean and unbiased
    covariance (as np.cov of the resample) from the weights."""
    n, d = x.shape
    mu = x.mean(0)
    xc = x - mu  # centred once: the weighted sums stay well conditioned
    rows = min(n, max(1, BLOCK_ELEMENTS // d))
    group = max(1, min(BLOCK_ELEMENTS // (d * rows), BLOCK_ELEMENTS // (d * d)))
    out = []
    for w, s in zip(weights.split(group), size.split(group)):
        w, s = w.double(), s[:, None, None]
        shift = w @ xc / s[:, :, 0]  # (g, D): weighted mean minus mu
        cov = torch.zeros(len(w), d, d, dtype=torch.float64, device=x.device)
        for a in range(0, n, rows):
            block = xc[a:a + rows]
            cov += (w[:, a:a + rows, None] * block).transpose(1, 2) @ block
        cov = (cov - s * shift[:, :, None] * shift[:, None, :]) / (s - 1)
        root = ref.sqrt_sigma
        eig = torch.linalg.eigvalsh(root @ cov @ root)
        diff = mu + shift - ref.mu
        out.append((diff * diff).sum(1) + cov.diagonal(dim1=1, dim2=2).sum(1) + ref.trace
                   - 2 * eig.clamp(min=0).sqrt().sum(1))
    return torch.cat(out)


def bootstrap_intervals(fake, real, settings: dict | None = None, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0, level: float = 0.95, device="cpu", point: dict | None = None,
                        chunk: int = CHUNK) -> dict:
    """For each metric m of METRICS: m_ci_low, m_ci_high (the interval at `level`) and m_se, from
    `resamples` resamples of the generated samples (coverage: see the module's docstring).

    real: reference features, or a Reference (built once per run: it holds the reference's mean,
    covariance root and k-NN radii). settings: pr_k, dc_k, and for KID's point estimate
    kid_subset_size, kid_subsets, seed (bench.metrics). point: the row's metrics where already
    computed (bench.metrics.compute_metrics), on which the intervals are centred; FID and the
    k-NN metrics are computed here otherwise, and kid_mean by bench.metrics.kid.
    Memory beyond the features: (resamples x N) float32 weights and chunk-sized blocks."""
    if not 0 < level < 1:
        raise BenchError(f"interval level must lie in (0, 1), got {level}")
    if resamples < 2 / (1 - level):
        raise BenchError(f"{resamples} resamples are too few for a {level:g} interval; "
                         f"need at least {math.ceil(2 / (1 - level))}")
    ref = real if isinstance(real, Reference) else Reference(real, settings, device, chunk)
    for key in ("pr_k", "dc_k"):
        if settings and key in settings and int(settings[key]) != getattr(ref, key):
            raise BenchError(f"settings ask for {key} = {settings[key]}, the Reference was built with {getattr(ref, key)}")
    fake = check_features(fake, "fake")
    counts = resample_counts(len(fake), resamples, seed)
    reps, set_var = _replicates(fake, ref, torch.cat([torch.ones(1, len(fake)), counts]))
    point = dict(point or {})
    for m in METRICS:
        if point.get(m) is None:
            if m == "kid_mean":
                s = {**ref.settings, **(settings or {})}
                point[m] = kid(fake, ref.features, subset_size=s["kid_subset_size"], subsets=s["kid_subsets"],
                               seed=s["seed"])["kid_mean"]
            else:
                point[m] = float(reps[m][0])
        if not math.isfinite(point[m]):
            raise BenchError(f"point estimate of {m} is not finite: {point[m]}")
    out = {}
    for m in METRICS:
        r = reps[m][1:].cpu().numpy()
        if set_var.get(m, 0) > 0:
            se = math.sqrt(set_var[m])
            half = float(scipy_stats.norm.ppf((1 + level) / 2)) * se
            low, high = -half, half
        else:  # coverage and recall too, where the covering-set variance comes out <= 0
            se = float(r.std(ddof=1))
            low, high = np.quantile(r - r.mean(), [(1 - level) / 2, (1 + level) / 2])
        out[f"{m}_ci_low"] = float(point[m] + low)
        out[f"{m}_ci_high"] = float(point[m] + high)
        out[f"{m}_se"] = se
    return out


# ----------------------------------------------------------------------------- repeats and tests


def summarise_repeats(values, level: float = 0.95) -> dict:
    """One metric over independent repeats (seeds): mean, SD, count, the t interval for the mean
    at `level` and the values themselves. With one value the SD and the interval are None."""
    vals = [float(v) for v in values]
    if not vals:
        raise BenchError("no repeated values to summarise")
    if not all(math.isfinite(v) for v in vals):
        raise BenchError(f"repeated values must be finite, got {vals}")
    if not 0 < level < 1:
        raise BenchError(f"interval level must lie in (0, 1), got {level}")
    n, mean = len(vals), float(np.mean(vals))
    if n == 1:
        return {"mean": mean, "sd": None, "n": 1, "ci_low": None, "ci_high": None, "values": vals}
    sd = float(np.std(vals, ddof=1))
    half = float(scipy_stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci_low": mean - half, "ci_high": mean + half, "values": vals}


def _field(row, key: str):
    value = row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)
    return None if value is None or value == "" else value


def standard_error(row, metric: str, level: float = 0.95) -> tuple[float, float]:
    """(standard error of the row's value of `metric`, its degrees of freedom: inf for a bootstrap).
    From, in order: repeats (n_seeds > 1: <metric>_sd / sqrt(n), else the t interval's half-width),
    <metric>_se, or a bootstrap interval's half-width / z. `level`: the level the row's interval has."""
    n = int(_field(row, "n_seeds") or 1)
    low, high = _field(row, f"{metric}_ci_low"), _field(row, f"{metric}_ci_high")
    if n > 1:
        sd = _field(row, f"{metric}_sd")
        if sd is not None:
            return float(sd) / math.sqrt(n), n - 1
        if low is not None and high is not None:
            return (float(high) - float(low)) / 2 / float(scipy_stats.t.ppf((1 + level) / 2, n - 1)), n - 1
    else:
        se = _field(row, f"{metric}_se")
        if se is not None:
            return float(se), math.inf
        if low is not None and high is not None:
            return (float(high) - float(low)) / 2 / float(scipy_stats.norm.ppf((1 + level) / 2)), math.inf
    raise BenchError(f"row {_field(row, 'slug') or ''!s} has no standard error, SD or interval for {metric}; "
                     f"was it scored with intervals?")


def difference_test(a, b, metric: str = "fid", level: float = 0.95, row_level: float = 0.95) -> dict:
    """Is `metric` of row b different from row a's (two independent runs)? A two-sided Welch test on
    b - a from each row's value and standard error (`standard_error`): a z test where both are
    bootstrap SEs, a t test with Welch-Satterthwaite degrees of freedom where a side comes from few
    repeats. The normal approximation holds well enough here: FID's replicates on digits have a
    skewness of 0.1-0.8, and the bootstrap SEs lean large, so p-values lean large (conservative).
    -> delta, ci_low, ci_high (its interval at `level`), se, df, p_value, significant (p < 1 - level)."""
    va, vb = _field(a, metric), _field(b, metric)
    if va is None or vb is None:
        raise BenchError(f"both rows need a value of {metric}")
    va, vb = float(va), float(vb)
    if not (math.isfinite(va) and math.isfinite(vb)):
        raise BenchError(f"{metric} values must be finite, got {va} and {vb}")
    (se_a, df_a), (se_b, df_b) = standard_error(a, metric, row_level), standard_error(b, metric, row_level)
    delta, se = vb - va, math.hypot(se_a, se_b)
    if se == 0:
        df, p, q = math.inf, 1.0 if delta == 0 else 0.0, 0.0
    else:
        terms = [s ** 4 / f for s, f in ((se_a, df_a), (se_b, df_b)) if math.isfinite(f)]
        df = se ** 4 / sum(terms) if terms else math.inf
        dist = scipy_stats.norm if math.isinf(df) else scipy_stats.t(df)
        p = float(2 * dist.sf(abs(delta) / se))
        q = float(dist.ppf((1 + level) / 2))
    return {"metric": metric, "delta": delta, "ci_low": delta - q * se, "ci_high": delta + q * se, "se": se,
            "df": df, "p_value": p, "significant": p < 1 - level}


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment: p-values that may each be compared with the level while the chance
    of any false "significant" in the family stays at most the level, whatever their dependence.
    The i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)); order is kept."""
    p = [float(v) for v in p_values]
    if any(not 0 <= v <= 1 for v in p):
        raise BenchError(f"p-values must lie in [0, 1], got {p}")
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out
