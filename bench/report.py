"""Tables and figures, rebuilt from stored rows only (the same rows give the same files)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .checkpoints import atomic_write_bytes, atomic_write_text  # noqa: E402
from .results import Row  # noqa: E402
from .stats import METRICS  # noqa: E402

CONTROL_STYLE = {"data": ("tab:green", "data (held-out real)"),
                 "reconstruction": ("tab:blue", "reconstruction (VQ)"),
                 "random-codes": ("tab:red", "random codes")}
# Deterministic PNGs: no timestamps or software versions in the metadata.
PNG_META = {"Software": None}


def image_grid_png(images: np.ndarray, columns: int = 8, scale: int = 2) -> bytes:
    """uint8 (N, H, W, C) -> PNG bytes of a grid with 1-pixel gutters, upscaled by nearest neighbour."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, Estimate):
        return v.text(digits)
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


@dataclass(frozen=True)
class Estimate:
    """A table cell holding a metric and its 95% interval: shown as `53.5 ± 3.0`, where 3.0 is half the
    interval's width; CSV tables keep the value and the interval's ends in columns of their own."""
    value: float
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, row, metric: str) -> "Estimate | None":
        value = getattr(row, metric)
        if value is None:
            return None
        return cls(value, getattr(row, f"{metric}_ci_low", None), getattr(row, f"{metric}_ci_high", None))

    def text(self, digits: int, plus_minus: str = "±") -> str:
        value = _fmt(self.value, digits)
        if self.low is None or self.high is None:
            return value
        return f"{value} {plus_minus} {_fmt((self.high - self.low) / 2, digits)}"


INTERVAL_NOTE = ("Values are `point ± half the width of the 95% interval` (bootstrap over the generated samples, "
                 "or the t interval over seeds where a row was repeated; `bench.stats`).")


def markdown_table(rows: list[Row]) -> str:
    cols = [("label", "row", 0), ("n_samples", "N", 0), ("fid", "FID", 2), ("kid_mean", "KID", 4),
            ("precision", "precision", 3), ("recall", "recall", 3), ("density", "density", 3),
            ("coverage", "coverage", 3), ("memorisation", "memorised", 3), ("nfe", "NFE", 0),
            ("img_per_s", "img/s", 1)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        cells = [Estimate.of(row, k) if k in METRICS else getattr(row, k) for k, _, _ in cols]
        lines.append("| " + " | ".join(_fmt(c, d) for c, (_, _, d) in zip(cells, cols)) + " |")
    return "\n".join(lines) + "\n"


# one look per sampler, so that two samplers with equal numbers (autoregressive and its recomputing
# execution draw the same tokens) still show as two lines: colour, line style, marker
LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def sampler_style(sampler: str, rows: list[Row]) -> dict:
    """A fixed style per sampler of this run, in order of first appearance."""
    names = list(dict.fromkeys(r.sampler for r in rows if r.sampler not in CONTROL_STYLE))
    i = names.index(sampler) if sampler in names else len(names)
    return {"color": plt.get_cmap("tab10")(i % 10), "ls": LINE_STYLES[i % len(LINE_STYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def _yerr(rows: list[Row], metric: str):
    """Asymmetric error bars from the rows' 95% intervals (zero where a row has none)."""
    lows, highs = [], []
    for r in rows:
        v, lo, hi = getattr(r, metric), getattr(r, f"{metric}_ci_low", None), getattr(r, f"{metric}_ci_high", None)
        lows.append(max(0.0, v - lo) if lo is not None else 0.0)
        highs.append(max(0.0, hi - v) if hi is not None else 0.0)
    return [lows, highs]


def _series(rows: list[Row]) -> dict:
    """(sampler, temperature, top_k, top_p) -> rows with steps, sorted by steps."""
    out: dict = {}
    for r in rows:
        if r.steps is None:
            continue
        key = (r.sampler, r.temperature, r.top_k, r.top_p)
        out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r.steps) for k, v in out.items()}


def _series_label(key) -> str:
    sampler, temp, top_k, top_p = key
    s = f"{sampler}, t={temp:g}"
    if top_k:
        s += f", top-k {top_k}"
    if top_p:
        s += f", top-p {top_p:g}"
    return s


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight", metadata=PNG_META)
    plt.close(fig)
    return buf.getvalue()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> bytes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def figure_metric_vs_steps(rows: list[Row], metric: str, ylabel: str, title: str, controls: bool,
                           paper_rows: list[Row] | None = None) -> bytes:
    """A metric against sampling steps: one line per sampler setting with its 95% intervals as error
    bars, samplers without steps as levels with their interval as a band, controls as dotted levels."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series = _series(rows)
    temps = {}
    for key, rs in series.items():
        rs = [r for r in rs if getattr(r, metric) is not None]
        if not rs:
            continue
        style = sampler_style(key[0], rows)
        temps.setdefault(key[0], []).append(key)
        shade = 1.0 - 0.25 * (len(temps[key[0]]) - 1)  # further temperatures of one sampler: lighter
        ax.errorbar([r.steps for r in rs], [getattr(r, metric) for r in rs], yerr=_yerr(rs, metric),
                    color=style["color"], ls=style["ls"], marker=style["marker"], ms=4, lw=1.3, capsize=2,
                    alpha=max(0.4, shade), label=_series_label(key))
    for r in rows:  # samplers without a step count (autoregressive): a level and its interval
        value = getattr(r, metric)
        if r.steps is None and r.sampler not in CONTROL_STYLE and value is not None:
            style = sampler_style(r.sampler, rows)
            ax.axhline(value, ls=style["ls"], lw=1.3, color=style["color"], label=(r.label or r.sampler))
            lo, hi = getattr(r, f"{metric}_ci_low", None), getattr(r, f"{metric}_ci_high", None)
            if lo is not None and hi is not None:
                ax.axhspan(lo, hi, color=style["color"], alpha=0.12, lw=0)
    if controls:
        for r in rows:
            if r.sampler in CONTROL_STYLE and getattr(r, metric) is not None:
                color, label = CONTROL_STYLE[r.sampler]
                ax.axhline(getattr(r, metric), ls=":", lw=1.5, color=color, label=label)
    for key, rs in _series(paper_rows or []).items():
        if rs and getattr(rs[0], metric) is not None:
            ax.plot([r.steps for r in rs], [getattr(r, metric) for r in rs], ls="none", marker="x", ms=7,
                    color=sampler_style(key[0], rows)["color"], label=f"paper: {_series_label(key)}")
    all_steps = sorted({r.steps for rs in list(series.values()) + list(_series(paper_rows or []).values())
                        for r in rs})
    if all_steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.minorticks_off()
    if metric == "fid" and controls and any(r.sampler == "random-codes" for r in rows):
        ax.set_yscale("log")
    return _finish(fig, ax, "sampling steps", ylabel, title)


def _place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = 5.5) -> None:
    """Label points without overlaps: each label goes to the first of a ring of offsets around its
    point whose box meets no label placed before it (greedy, in display coordinates)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    offsets = [(4, 3), (4, -9), (-4, 3), (-4, -9), (4, 10), (4, -16), (-4, 10), (-4, -16), (10, -3), (-10, -3),
               (4, 17), (4, -23), (-4, 17), (-4, -23)]
    for x, y, text in sorted(points, key=lambda p: (p[0], p[1])):
        for dx, dy in offsets:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx >= 0 else "right", color="0.2")
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            ann.remove()
        else:  # no free place nearby: keep the first, faded
            ann = ax.annotate(text, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=fontsize,
                              color="0.6")
            placed.append(ann.get_window_extent(renderer))


def figure_pareto(rows: list[Row], title: str) -> bytes:
    """FID against seconds per image: the quality/speed trade-off, with each row's 95% interval and
    the Pareto front."""
    sampled = [r for r in rows if r.img_per_s and r.fid is not None and r.sampler not in CONTROL_STYLE]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for sampler in dict.fromkeys(r.sampler for r in sampled):
        sel = [r for r in sampled if r.sampler == sampler]
        style = sampler_style(sampler, rows)
        ax.errorbar([1.0 / r.img_per_s for r in sel], [r.fid for r in sel], yerr=_yerr(sel, "fid"), ls="none",
                    marker=style["marker"], ms=4.5, color=style["color"], capsize=2, lw=1, label=sampler, zorder=3)
    front, best = [], float("inf")
    for x, y in sorted((1.0 / r.img_per_s, r.fid) for r in sampled):
        if y < best:
            front.append((x, y))
            best = y
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, zorder=2,
                label="Pareto front")
    for r in rows:
        if r.sampler in CONTROL_STYLE and r.fid is not None and r.sampler != "random-codes":
            color, label = CONTROL_STYLE[r.sampler]
            ax.axhline(r.fid, ls=":", lw=1.2, color=color, label=label)
    if sampled:
        ax.set_xscale("log")
    ax.legend(fontsize=7, frameon=False)
    _place_labels(ax, [(1.0 / r.img_per_s, r.fid, _short_label(r)) for r in sampled])
    return _finish(fig, ax, "seconds per image (sampling + decoding)", "FID", title)


def _short_label(r: Row) -> str:
    parts = [f"{r.steps} st" if r.steps is not None else (r.sampler or "")]
    if r.temperature is not None and r.temperature != 1.0:
        parts.append(f"t={r.temperature:g}")
    return " ".join(parts)


def figure_sample_grids(run_dir: Path, rows: list[dict]) -> bytes | None:
    grids = [((r.label or r.slug), Path(run_dir) / "samples" / f"{r.slug}.png") for r in rows]
    grids = [(label, p) for label, p in grids if p.is_file()]
    if not grids:
        return None
    cols = min(4, len(grids))
    nrows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, p) in zip(axes.flat, grids):
        img = np.asarray(Image.open(p))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- tables

def _paper_by_slug(paper_rows):
    return {r.slug: r for r in (paper_rows or [])}


def table_fid_vs_steps(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Table-3 style: one row per (dataset, sampler, temperature), one column per step count."""
    series = _series(rows)
    steps = sorted({r.steps for rs in series.values() for r in rs})
    header = ["dataset", "sampler"] + [str(s) for s in steps]
    body = []
    for key, rs in series.items():
        by = {r.steps: Estimate.of(r, "fid") for r in rs}
        body.append([rs[0].dataset, _series_label(key)] + [by.get(s) for s in steps])
    return header, body


def table_prdc(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Table-1 style: precision, recall, density, coverage per row."""
    header = ["dataset", "row", "precision", "recall", "density", "coverage"]
    return header, [[r.dataset, (r.label or r.slug)] + [Estimate.of(r, m) for m in header[2:]] for r in rows]


def best_rows(rows: list[Row]) -> set[str]:
    """Each sampler's row of lowest FID (over its steps and temperatures): its best setting here."""
    best: dict = {}
    for r in rows:
        if r.fid is not None and r.sampler not in CONTROL_STYLE and (r.sampler not in best or r.fid < best[r.sampler].fid):
            best[r.sampler] = r
    return {r.slug for r in best.values()}


def table_fid_per_sampler(rows: list[Row], paper_rows=None) -> tuple[list[str], list[list]]:
    """Table-2 style: FID of every row, each sampler's best row marked, with the paper's number for the
    same row where there is one."""
    paper = _paper_by_slug(paper_rows)
    best = best_rows(rows)
    header = ["dataset", "row", "best of its sampler", "N", "FID", "paper FID", "img/s", "NFE"]
    return header, [[r.dataset, (r.label or r.slug), "best" if r.slug in best else "", r.n_samples,
                     Estimate.of(r, "fid"), getattr(paper.get(r.slug), "fid", None), r.img_per_s, r.nfe]
                    for r in rows]


def _cell(v, digits=3, plus_minus="±"):
    if isinstance(v, Estimate):
        return v.text(digits, plus_minus)
    return _fmt(v, digits) if not isinstance(v, str) else v


def render_markdown(header, body, digits=3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def render_latex(header, body, digits=3) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_cell(v, digits, "PLUSMINUS")).replace("PLUSMINUS", r"$\pm$") or "--" for v in row)
              + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_csv(header, body) -> str:
    """A column of estimates becomes three: the value and its interval's ends."""
    import csv
    estimates = {j for row in body for j, v in enumerate(row) if isinstance(v, Estimate)}
    out_header = []
    for j, h in enumerate(header):
        out_header += [h, f"{h} ci_low", f"{h} ci_high"] if j in estimates else [h]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(out_header)
    for row in body:
        line = []
        for j, v in enumerate(row):
            if j in estimates:
                e = v if isinstance(v, Estimate) else Estimate(v) if v is not None else None
                line += ["" if e is None else e.value, "" if e is None or e.low is None else e.low,
                         "" if e is None or e.high is None else e.high]
            else:
                line.append("" if v is None else v)
        w.writerow(line)
    return buf.getvalue()


def write_tables(out_dir: Path, rows: list[dict], paper_rows=None) -> list[Path]:
    written = []
    tables = {"fid_vs_steps": (table_fid_vs_steps(rows), 2), "prdc": (table_prdc(rows), 3),
              "fid_per_sampler": (table_fid_per_sampler(rows, paper_rows), 2)}
    for name, ((header, body), digits) in tables.items():
        for ext, text in (("md", render_markdown(header, body, digits)), ("tex", render_latex(header, body, digits)),
                          ("csv", render_csv(header, body))):
            path = Path(out_dir) / "tables" / f"{name}.{ext}"
            atomic_write_text(path, text)
            written.append(path)
    return written


def paper_rows_for(run_dir: Path) -> list[dict] | None:
    """The published numbers stored beside a run (results/<dataset>/paper/), if any."""
    paper = Path(run_dir).parent / "paper" / "results.json"
    if not paper.is_file() or Path(run_dir).name == "paper":
        return None
    from .results import load_run
    return load_run(paper.parent)[1]


def write_all(run_dir: Path, manifest: dict, rows: list[dict], paper_rows: list[dict] | None = None) -> list[Path]:
    """Every table and figure of a run, from its rows alone."""
    run_dir = Path(run_dir)
    if paper_rows is None:
        paper_rows = paper_rows_for(run_dir)
    title = f"{manifest['dataset']}, N={manifest['num_samples']}, features: {manifest['extractor']}"
    header = (f"# {manifest['dataset']}: {run_dir.name}\n\n"
              f"{manifest['num_samples']} samples per sampler row (control rows use the held-out split), "
              f"reference: the {manifest.get('reference', {}).get('count', '?')} images of the training split, "
              f"features: {manifest['extractor']}, seed {manifest['seed']}, device: {manifest['device']}, "
              f"execution: {manifest.get('execution', 'plain')} (each row's switches in results.csv).\n\n")
    where = f"{manifest['device']}, execution {manifest.get('execution', 'plain')}"
    outputs = {
        "results.md": (header + INTERVAL_NOTE + "\n\n" + markdown_table(rows)).encode(),
        "fid_vs_steps.png": figure_metric_vs_steps(rows, "fid", "FID", title, True, paper_rows),
        "img_per_s_vs_steps.png": figure_metric_vs_steps(rows, "img_per_s", "images / s (sampling + decoding)",
                                                         f"{title}\n{where}", False),
        "fid_vs_seconds_per_image.png": figure_pareto(rows, f"{title}\n{where}"),
    }
    grids = figure_sample_grids(run_dir, rows)
    if grids is not None:
        outputs["samples.png"] = grids
    for name, data in outputs.items():
        atomic_write_bytes(run_dir / name, data)
    return [run_dir / n for n in outputs] + write_tables(run_dir, rows, paper_rows)
