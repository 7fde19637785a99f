"""`bench compare` and `bench check`: stored runs side by side, and the thresholds of bench.toml."""
from __future__ import annotations

from pathlib import Path

from .errors import BenchError
from .stats import METRICS as STAT_METRICS, difference_test, holm
from .results import PROTOCOL_KEYS, Row, is_published, load_run, protocol_differences

METRICS = ("fid", "kid_mean", "precision", "recall", "density", "coverage", "img_per_s")
# Throughput of rows whose timed batch is shorter than this is not judged by `bench check`.
MIN_TIMED_SECONDS = 0.05
ALPHA = 0.05  # significance level of every test here


def _too_short_to_time(*rows: Row) -> bool:
    times = [r.sample_s_per_batch for r in rows]
    return any(t is None or t < MIN_TIMED_SECONDS for t in times)


def find_run(results_dir: Path, dataset: str | None, name: str | None) -> Path:
    """A run by path, by name under results/<dataset>/, or the latest finished run of the dataset."""
    if name is not None:
        p = Path(name)
        if (p / "results.json").is_file() or (p.is_file() and p.name == "results.json"):
            return p if p.is_dir() else p.parent
        if dataset is not None and (results_dir / dataset / name / "results.json").is_file():
            return results_dir / dataset / name
        raise BenchError(f"no finished run at {name!r}"
                         + (f" or {results_dir / dataset / name}" if dataset else "")
                         + "; give a run directory holding results.json")
    if dataset is None:
        raise BenchError("no run given and no dataset to look in; pass a run directory")
    runs = [p.parent for p in (results_dir / dataset).glob("*/results.json")
            if p.parent.name != "baseline" and not is_published(p.parent)]
    if not runs:
        raise BenchError(f"no finished run under {results_dir / dataset}; run `bench run --dataset {dataset}` first")
    return max(runs, key=lambda p: (p / "results.json").stat().st_mtime)


def significance(ref: Row, row: Row, metric: str) -> dict | None:
    """bench.stats.difference_test of one metric where both rows carry intervals (or repeats), else None:
    a two-sided Welch test on the difference from each row's standard error."""
    if metric not in STAT_METRICS or getattr(ref, metric) is None or getattr(row, metric) is None:
        return None
    try:
        return difference_test(ref, row, metric)
    except BenchError:
        return None  # a row scored without intervals: the delta cannot be judged against noise


def _delta(a, b):
    if a is None or b is None:
        return None, None
    d = b - a
    return d, (d / abs(a) if a else None)


def compare_runs(ref_dir: Path, run_dir: Path, thresholds: dict, allow_mismatch: bool) -> dict:
    """Rows shared by slug, with absolute and relative deltas of RUN against REF."""
    ref_manifest, ref_rows = load_run(ref_dir)
    manifest, rows = load_run(run_dir)
    if ref_manifest.get("dataset") != manifest.get("dataset"):
        raise BenchError(f"runs {ref_dir} and {run_dir} are of different datasets ({ref_manifest.get('dataset')!r} "
                         f"vs {manifest.get('dataset')!r}); bench compares runs of one dataset only")
    published = ref_manifest.get("kind") == "published" or manifest.get("kind") == "published"
    # published numbers state only part of their protocol: compare what they state
    diff = protocol_differences(ref_manifest, manifest, ("num_samples", "extractor") if published else PROTOCOL_KEYS)
    if diff and not allow_mismatch:
        raise BenchError(f"runs {ref_dir} and {run_dir} follow different protocols ({'; '.join(diff)}); "
                         f"pass --allow-mismatch to compare anyway")
    same_device = ref_manifest.get("device") == manifest.get("device")
    ref_by = {r.slug: r for r in ref_rows}
    out = []
    for row in rows:
        ref = ref_by.get(row.slug)
        if ref is None:
            continue
        entry = {"slug": row.slug, "label": (row.label or row.slug), "metrics": {},
                 "switches": {"ref": ref.switches or "plain", "run": row.switches or "plain"}}
        for m in METRICS:
            a, b = getattr(ref, m), getattr(row, m)
            if a is None and b is None:
                continue
            d, rel = _delta(a, b)
            test = significance(ref, row, m)
            flag = False
            untimeable = m == "img_per_s" and _too_short_to_time(ref, row)
            if m == "img_per_s" and rel is not None and thresholds.throughput_regression is not None:
                flag = same_device and not untimeable and -rel > thresholds.throughput_regression
            entry["metrics"][m] = {"ref": a, "run": b, "delta": d, "rel": rel, "beyond_threshold": flag,
                                   "untimeable": untimeable, "test": test}
        out.append(entry)
    _judge_fid(out, thresholds)
    return {"ref": str(ref_dir), "run": str(run_dir), "protocol_differences": diff,
            "same_device": same_device, "rows": out}


def _judge_fid(entries: list[dict], thresholds) -> None:
    """An FID regression is a rise beyond fid_regression that is not noise (where both rows can say).
    Every row's FID is a test of its own, so the p-values are Holm-adjusted over the rows compared
    (`p_holm`): a run of unchanged code fails on noise in at most 5% of comparisons however many rows
    it has, not 5% per row."""
    fid = [e["metrics"]["fid"] for e in entries if "fid" in e["metrics"]]
    tested = [v["test"] for v in fid if v["test"] is not None]
    for test, adjusted in zip(tested, holm([t["p_value"] for t in tested])):
        test["p_holm"], test["family"] = adjusted, len(tested)
        test["significant_holm"] = adjusted < ALPHA
    if thresholds.fid_regression is None:
        return
    for v in fid:
        if v["rel"] is not None:
            v["beyond_threshold"] = v["rel"] > thresholds.fid_regression and (
                v["test"] is None or v["test"]["significant_holm"])


def format_comparison(cmp: dict) -> str:
    lines = [f"REF {cmp['ref']}", f"RUN {cmp['run']}"]
    if cmp["protocol_differences"]:
        lines.append("protocol differs: " + "; ".join(cmp["protocol_differences"]))
    if not cmp["same_device"]:
        lines.append("devices differ: throughput deltas are not judged")
    for entry in cmp["rows"]:
        sw = entry.get("switches", {})
        if sw and sw["ref"] != sw["run"]:
            lines.append(f"execution differs for {entry['label']}: REF {sw['ref']}, RUN {sw['run']}")
    lines.append("")
    lines.append("| row | metric | REF | RUN | delta | rel | 95% interval of delta | p | noise? |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for entry in cmp["rows"]:
        for m, v in entry["metrics"].items():
            mark = " **!**" if v["beyond_threshold"] else ""
            rel = "" if v["rel"] is None else f"{100 * v['rel']:+.1f}%"
            t = v.get("test")
            interval = "" if t is None else f"[{fmt(t['ci_low'])}, {fmt(t['ci_high'])}]"
            p = "" if t is None else f"{t['p_value']:.3g}" + (f" (Holm {t['p_holm']:.3g})" if "p_holm" in t else "")
            verdict = "no interval" if t is None else "significant" if t.get("significant_holm", t["significant"]) \
                else "within noise"
            lines.append(f"| {entry['label']} | {m} | {fmt(v['ref'])} | {fmt(v['run'])} | {fmt(v['delta'])} | {rel}{mark} "
                         f"| {interval} | {p} | {verdict} |")
    if not cmp["rows"]:
        lines.append("(no rows in common)")
    lines.append("")
    lines.append("noise?: a two-sided Welch test of the difference from each row's standard error (bootstrap, or "
                 "repeated seeds), bench.stats.difference_test; significant where p < 0.05 (FID: Holm-adjusted over "
                 "the rows compared). **!**: beyond a threshold of bench.toml (an FID rise counts only where it "
                 "is also significant).")
    return "\n".join(lines) + "\n"


def check_run(run_dir: Path, thresholds: dict, baseline_dir: Path | None) -> dict:
    """Every threshold of bench.toml for this run's dataset. -> {passed, failures, checks}."""
    manifest, rows = load_run(run_dir)
    failures, checks = [], []
    by = {r.slug: r for r in rows}
    for slug, ceiling in thresholds.fid_ceiling.items():
        row = by.get(slug)
        if row is None:
            failures.append(f"{slug}: no such row in the run (a ceiling is set for it)")
            continue
        if row.fid is None:
            failures.append(f"{slug}: the row has no FID (a ceiling is set for it)")
            continue
        ok = row.fid <= ceiling
        checks.append(f"{slug}: FID {row.fid:.3f} <= ceiling {ceiling}: {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"{slug}: FID {row.fid:.3f} above the ceiling {ceiling}")
    if baseline_dir is not None and (thresholds.fid_regression is not None
                                     or thresholds.throughput_regression is not None):
        try:
            cmp = compare_runs(baseline_dir, run_dir, thresholds, allow_mismatch=False)
        except BenchError as e:
            failures.append(f"baseline comparison impossible: {e}")
            cmp = None
        if cmp is not None:
            if not cmp["rows"]:
                failures.append(f"no rows in common with the baseline {baseline_dir}")
            for entry in cmp["rows"]:
                for m, v in entry["metrics"].items():
                    if m not in ("fid", "img_per_s") or v["rel"] is None:
                        continue
                    if m == "img_per_s" and not cmp["same_device"]:
                        continue
                    if v["untimeable"]:
                        checks.append(f"{entry['slug']}: img_per_s not judged: a timed batch took under "
                                      f"{MIN_TIMED_SECONDS} s, too short to time reliably")
                        continue
                    status = "FAILED" if v["beyond_threshold"] else "ok"
                    t = v.get("test")
                    noise = "" if m != "fid" else (", no interval to test" if t is None else
                                                    f", p = {t['p_value']:.3g}, Holm over {t['family']} rows "
                                                    f"{t['p_holm']:.3g}: " +
                                                    ("significant" if t["significant_holm"] else "within noise"))
                    checks.append(f"{entry['slug']}: {m} {v['run']:.4g} vs baseline {v['ref']:.4g} "
                                  f"({100 * v['rel']:+.1f}%{noise}): {status}")
                    if v["beyond_threshold"]:
                        failures.append(f"{entry['slug']}: {m} {v['run']:.4g} vs baseline {v['ref']:.4g} "
                                        f"({100 * v['rel']:+.1f}%{noise}) beyond the threshold")
            if not cmp["same_device"]:
                checks.append("throughput not compared: the baseline ran on another device")
    return {"run": str(run_dir), "baseline": str(baseline_dir) if baseline_dir else None,
            "passed": not failures, "failures": failures, "checks": checks}
