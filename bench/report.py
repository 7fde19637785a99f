"""Tables and figures, rebuilt from stored rows only (the same rows give the same files)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .checkpoints import atomic_write_bytes, atomic_write_text  # noqa: E402

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
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = [("label", "row", 0), ("n_samples", "N", 0), ("fid", "FID", 2), ("kid_mean", "KID", 4),
            ("precision", "precision", 3), ("recall", "recall", 3), ("density", "density", 3),
            ("coverage", "coverage", 3), ("memorisation", "memorised", 3), ("nfe", "NFE", 0),
            ("img_per_s", "img/s", 1)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(getattr(row, k), d) for k, _, d in cols) + " |")
    return "\n".join(lines) + "\n"


def _series(rows: list[dict]) -> dict:
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


def figure_metric_vs_steps(rows: list[dict], metric: str, ylabel: str, title: str, controls: bool,
                           paper_rows: list[dict] | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series = _series(rows)
    colors = {}
    for i, (key, rs) in enumerate(series.items()):
        line, = ax.plot([r.steps for r in rs], [getattr(r, metric) for r in rs], marker="o", label=_series_label(key))
        colors[key] = line.get_color()
    for r in rows:  # samplers without a step count (autoregressive): a dashed level
        if r.steps is None and r.sampler not in CONTROL_STYLE and getattr(r, metric) is not None:
            ax.axhline(getattr(r, metric), ls="--", lw=1.2, color="tab:purple", label=(r.label or r.sampler))
    if controls:
        for r in rows:
            if r.sampler in CONTROL_STYLE and getattr(r, metric) is not None:
                color, label = CONTROL_STYLE[r.sampler]
                ax.axhspan(getattr(r, metric) * 0.98, getattr(r, metric) * 1.02, color=color, alpha=0.25, lw=0)
                ax.axhline(getattr(r, metric), ls=":", lw=1.5, color=color, label=label)
    for key, rs in _series(paper_rows or []).items():
        if rs and getattr(rs[0], metric) is not None:
            ax.plot([r.steps for r in rs], [getattr(r, metric) for r in rs], ls="none", marker="x", ms=7,
                    color=colors.get(key, "black"), label=f"paper: {_series_label(key)}")
    all_steps = sorted({r.steps for rs in list(series.values()) + list(_series(paper_rows or []).values())
                        for r in rs})
    if all_steps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.minorticks_off()
    if metric == "fid" and controls and any(r.sampler == "random-codes" for r in rows):
        ax.set_yscale("log")
    return _finish(fig, ax, "sampling steps", ylabel, title)


def figure_pareto(rows: list[dict], title: str) -> bytes:
    """FID against seconds per image: the quality/speed trade-off, with the Pareto front."""
    pts = [(1.0 / r.img_per_s, r.fid, (r.label or r.slug)) for r in rows
           if r.img_per_s and r.fid is not None and r.sampler not in CONTROL_STYLE]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    samplers = sorted({r.sampler for r in rows if r.img_per_s and r.sampler not in CONTROL_STYLE})
    for sampler in samplers:
        sel = [(1.0 / r.img_per_s, r.fid) for r in rows if r.sampler == sampler and r.img_per_s]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=sampler, s=22, zorder=3)
    front, best = [], float("inf")
    for x, y, _ in sorted(pts):
        if y < best:
            front.append((x, y))
            best = y
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, zorder=2,
                label="Pareto front")
    for x, y, label in pts:
        ax.annotate(label.split(", t=")[0], (x, y), fontsize=5, xytext=(3, 2), textcoords="offset points")
    for r in rows:
        if r.sampler in CONTROL_STYLE and r.fid is not None and r.sampler != "random-codes":
            color, label = CONTROL_STYLE[r.sampler]
            ax.axhline(r.fid, ls=":", lw=1.2, color=color, label=label)
    if pts:
        ax.set_xscale("log")
    return _finish(fig, ax, "seconds per image (sampling + decoding)", "FID", title)


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
        by = {r.steps: r.fid for r in rs}
        body.append([rs[0].dataset, _series_label(key)] + [by.get(s) for s in steps])
    return header, body


def table_prdc(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Table-1 style: precision, recall, density, coverage per row."""
    header = ["dataset", "row", "precision", "recall", "density", "coverage"]
    return header, [[r.dataset, (r.label or r.slug), r.precision, r.recall,
                     r.density, r.coverage] for r in rows]


def table_fid_per_sampler(rows: list[dict], paper_rows=None) -> tuple[list[str], list[list]]:
    """Table-2 style: FID of every row, with the paper's number for the same row where there is one."""
    paper = _paper_by_slug(paper_rows)
    header = ["dataset", "row", "N", "FID", "paper FID", "img/s", "NFE"]
    return header, [[r.dataset, (r.label or r.slug), r.n_samples, r.fid,
                     getattr(paper.get(r.slug), "fid", None), r.img_per_s, r.nfe] for r in rows]


def _cell(v, digits=3):
    return _fmt(v, digits) if not isinstance(v, str) else v


def render_markdown(header, body, digits=3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def render_latex(header, body, digits=3) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_cell(v, digits)) or "--" for v in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_csv(header, body) -> str:
    import csv
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in row] for row in body])
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
        "results.md": (header + markdown_table(rows)).encode(),
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
