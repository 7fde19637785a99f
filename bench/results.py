"""The results store: one directory per run, written atomically, resumable, never silently overwritten.

    results/<dataset>/<run-name>/
        manifest.json     config, versions, git commit, device, seeds, hashes (written first)
        rows/<slug>.json  one finished row each (what --resume keeps)
        samples/<slug>.png
        results.json      manifest and rows; its presence marks the run finished
        results.csv       the schema of DESIGN.md
        results.md, fid_vs_steps.png, img_per_s_vs_steps.png
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from .checkpoints import atomic_write_bytes, atomic_write_text
from .errors import BenchError

SCHEMA = ["dataset", "sampler", "steps", "temperature", "top_k", "top_p", "n_samples", "features", "fid",
          "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "img_per_s",
          "sample_s_per_batch", "decode_s_per_batch", "nfe", "peak_mem_mb", "batch_size", "device", "dtype",
          "seed", "switches"]  # DESIGN.md's schema, then the execution switches in effect (bench.execution)
# What must match for --resume to keep finished rows, and for `bench compare` without --allow-mismatch.
PROTOCOL_KEYS = ("dataset", "dataset_content", "num_samples", "seed", "extractor", "hashes", "metrics")
# --resume also keeps the execution switches: finished rows were sampled under them (compare shows
# differing switches per row instead of refusing). Manifests written before the key existed ran plain.
RESUME_KEYS = PROTOCOL_KEYS + ("execution",)
MANIFEST_DEFAULTS = {"execution": "plain"}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("bench", "torch", "torchvision", "torch-fidelity", "numpy", "scipy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def build_manifest(cfg, ds, req, pipe, n: int, plan) -> dict:
    from dataclasses import asdict
    from .timing import device_name
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config_file": str(cfg.path),
        "profile": cfg.profile,
        "config": cfg.raw,
        "dataset": ds.name,
        "dataset_content": pipe.train.content_id(),
        "heldout_content": pipe.heldout.content_id() if pipe.heldout is not None else None,
        # images or records dropped as undecodable (on_corrupt = "skip"), per split
        "skipped": {split: len(getattr(data, "skipped", [])) for split, data in
                    (("train", pipe.train), ("heldout", pipe.heldout)) if data is not None},
        "num_samples": n,
        "seed": cfg.run["seed"],
        "seeding": "sample i draws from its own generator seeded by numpy SeedSequence([seed, i])",
        "extractor": pipe.extractor.name,
        "hashes": pipe.hashes,
        "metrics": {**cfg.metrics, **ds.metrics},
        "timing": {**cfg.timing, "peak_mem_mb": "cuda: max allocated; cpu: process peak RSS (high-water mark)"},
        "rows": [s.as_dict() if s is not None else {"sampler": name} for name, s in plan],
        "device": device_name(pipe.device),
        "execution": pipe.execution.spec(),  # speed switches asked for; each row says which applied
        "versions": versions(),
        "git": git_commit(),
        "dataset_config": {k: v for k, v in asdict(ds).items() if k != "sweep"},
    }


def run_dir_for(cfg, ds, req) -> Path:
    name = req.run_name or time.strftime("%Y%m%d-%H%M%S")
    if not name or "/" in name or name.startswith("."):
        raise BenchError(f"--run-name {name!r} must be a plain folder name")
    return Path(cfg.run["results_dir"]) / ds.name / name


def check_run_dir(cfg, ds, req, manifest: dict) -> Path:
    """The run's directory, after checking that writing there is allowed; creates nothing."""
    run_dir = run_dir_for(cfg, ds, req)
    if is_published(run_dir):
        raise BenchError(f"{run_dir} holds published numbers (manifest kind 'published'); bench never writes "
                         f"there, not even with --force: choose another --run-name")
    if run_dir.exists() and not req.force:
        finished = (run_dir / "results.json").is_file()
        if req.resume and not finished:
            diff = protocol_differences(read_json(run_dir / "manifest.json"), manifest, RESUME_KEYS)
            if diff:
                raise BenchError(f"cannot resume {run_dir}: its protocol differs ({'; '.join(diff)}); "
                                 f"use a new --run-name or --force")
        elif finished:
            raise BenchError(f"run {run_dir} is finished; pass --force to overwrite it or choose another --run-name")
        else:
            raise BenchError(f"run {run_dir} exists and is unfinished; pass --resume to continue it or --force to restart")
    return run_dir


def is_published(run_dir: Path) -> bool:
    """Whether a stored run holds published numbers (bench.paper) rather than a run of this harness."""
    for f, pick in ((run_dir / "results.json", lambda d: d.get("manifest", {})), (run_dir / "manifest.json", dict)):
        try:
            if pick(json.loads(f.read_text())).get("kind") == "published":
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def create_run_dir(run_dir: Path, manifest: dict, force: bool) -> None:
    """Called when the first row is ready, so bad input found earlier leaves nothing behind."""
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "rows").mkdir(parents=True, exist_ok=True)
    write_manifest(run_dir, manifest)


class ShardStore:
    """The finished batches of a row still being computed: its features and sample-grid images, one
    file per batch, written atomically, so a killed run resumes without recomputing them. The
    folder is removed once the row itself is written."""

    def __init__(self, folder: Path, batch_size: int, before_first_write=lambda: None):
        self.folder, self.batch_size, self.before_first_write = Path(folder), batch_size, before_first_write

    def _file(self, start: int) -> Path:
        return self.folder / f"b{self.batch_size}-{start:09d}.npz"

    def load(self, start: int) -> tuple[np.ndarray, dict] | None:
        f = self._file(start)
        if not f.is_file():
            return None
        with np.load(f, allow_pickle=False) as z:
            return z["features"], dict(zip(z["grid_index"].tolist(), z["grid_images"]))

    def save(self, start: int, features: np.ndarray, grid: dict) -> None:
        self.before_first_write()
        idx = sorted(grid)
        buf = io.BytesIO()
        np.savez(buf, features=features, grid_index=np.array(idx, dtype=np.int64),
                 grid_images=np.stack([grid[i] for i in idx]) if idx else np.zeros((0, 1, 1, 1), np.uint8))
        atomic_write_bytes(self._file(start), buf.getvalue())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def protocol_differences(a: dict, b: dict, keys: tuple[str, ...] = PROTOCOL_KEYS) -> list[str]:
    """What differs between two runs' manifests under `keys`. Checkpoint hashes are compared where
    both runs loaded the same model (a run of fewer samplers loads fewer priors)."""
    out = []
    for k in keys:
        va, vb = a.get(k, MANIFEST_DEFAULTS.get(k)), b.get(k, MANIFEST_DEFAULTS.get(k))
        if k == "hashes" and isinstance(va, dict) and isinstance(vb, dict):
            va = {m: h for m, h in va.items() if m in vb}
            vb = {m: h for m, h in vb.items() if m in va}
        if va != vb:
            out.append(f"{k}: {va!r} vs {vb!r}")
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise BenchError(f"{path} is not valid JSON ({e})") from None


def _json(obj) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=2) + "\n"


def write_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write_text(run_dir / "manifest.json", _json(manifest))


def write_row(run_dir: Path, row: dict) -> None:
    atomic_write_text(run_dir / "rows" / f"{row['slug']}.json", _json(row))


def finished_rows(run_dir: Path) -> dict:
    rows = {}
    for f in sorted((run_dir / "rows").glob("*.json")):
        row = read_json(f)
        rows[row["slug"]] = row
    return rows


def save_grid(run_dir: Path, slug: str, images: np.ndarray) -> None:
    from .report import image_grid_png
    atomic_write_bytes(run_dir / "samples" / f"{slug}.png", image_grid_png(images))


def to_csv(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    """The columns of SCHEMA, then `extra`; unknown values empty."""
    fields = SCHEMA + [k for k in extra if k not in SCHEMA]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buf.getvalue()


def finish(run_dir: Path, manifest: dict, rows: list[dict]) -> None:
    from . import report
    manifest = {**manifest, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "results.csv", to_csv(rows))
    report.write_all(run_dir, manifest, rows)
    # last: its presence marks the run finished
    atomic_write_text(run_dir / "results.json", _json({"manifest": manifest, "rows": rows}))


def load_run(path: str | Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    f = path / "results.json" if path.is_dir() else path
    data = read_json(f)
    return data["manifest"], data["rows"]
