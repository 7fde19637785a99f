"""Typed result rows and the run store: one directory per run, written atomically, resumable, locked,
never silently overwritten, and published runs never written at all.

    results/<dataset>/<run-name>/
        manifest.json     config, versions, git commit, device, seeds, hashes (written first)
        rows/<slug>.json  one finished row each (what --resume keeps)
        rows/<slug>.shards/   the finished batches of the row being computed
        samples/<slug>.png
        results.json      manifest and rows; its presence marks the run finished
        results.csv       the schema of DESIGN.md (Row's CSV fields, in order)
        results.md, tables/, figures
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path

import numpy as np

from .checkpoints import atomic_write_bytes, atomic_write_text, check_folder, write_error
from .errors import BenchError
from .paths import check_plain_name

# ----------------------------------------------------------------------------- rows

JSON_ONLY = {"csv": False}


@dataclass
class Row:
    """One row of results: a control, a sampler configuration, a perf measurement or a published
    number. The CSV columns are the fields not marked JSON_ONLY, in this order: DESIGN.md's schema,
    then the columns appended since (never reordered, so old CSVs stay readable). Unknown values
    are None, never invented."""
    dataset: str | None = None
    sampler: str | None = None
    steps: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    n_samples: int | None = None
    features: str | None = None
    fid: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    density: float | None = None
    coverage: float | None = None
    img_per_s: float | None = None          # sampling and decoding
    sample_s_per_batch: float | None = None
    decode_s_per_batch: float | None = None
    nfe: int | None = None
    peak_mem_mb: float | None = None
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int | None = None
    switches: str | None = None             # execution switches in effect (bench.execution)
    tokenizer: str | None = None            # the first stage that decoded the row (none for `data`)
    # 95% intervals (bench.stats): a bootstrap over the generated samples, or from repeated seeds
    fid_ci_low: float | None = None
    fid_ci_high: float | None = None
    kid_mean_ci_low: float | None = None
    kid_mean_ci_high: float | None = None
    precision_ci_low: float | None = None
    precision_ci_high: float | None = None
    recall_ci_low: float | None = None
    recall_ci_high: float | None = None
    density_ci_low: float | None = None
    density_ci_high: float | None = None
    coverage_ci_low: float | None = None
    coverage_ci_high: float | None = None
    fid_sd: float | None = None             # SD of FID over repeated seeds (--seeds)
    n_seeds: int | None = None
    # JSON only: what identifies and explains the row
    slug: str | None = field(default=None, metadata=JSON_ONLY)
    label: str | None = field(default=None, metadata=JSON_ONLY)
    execution: str | None = field(default=None, metadata=JSON_ONLY)
    kid_subset_size: int | None = field(default=None, metadata=JSON_ONLY)
    memorisation: float | None = field(default=None, metadata=JSON_ONLY)
    fid_cleanfid: float | None = field(default=None, metadata=JSON_ONLY)
    sampling_img_per_s: float | None = field(default=None, metadata=JSON_ONLY)
    end_to_end_img_per_s: float | None = field(default=None, metadata=JSON_ONLY)
    end_to_end_overhead: float | None = field(default=None, metadata=JSON_ONLY)
    features_s_per_batch: float | None = field(default=None, metadata=JSON_ONLY)
    passes_per_image: float | None = field(default=None, metadata=JSON_ONLY)
    timed_with: str | None = field(default=None, metadata=JSON_ONLY)   # the row whose timing this row shares
    # standard errors (bench.stats.standard_error reads them), SDs over seeds, each seed's values
    fid_se: float | None = field(default=None, metadata=JSON_ONLY)
    kid_mean_se: float | None = field(default=None, metadata=JSON_ONLY)
    precision_se: float | None = field(default=None, metadata=JSON_ONLY)
    recall_se: float | None = field(default=None, metadata=JSON_ONLY)
    density_se: float | None = field(default=None, metadata=JSON_ONLY)
    coverage_se: float | None = field(default=None, metadata=JSON_ONLY)
    kid_mean_sd: float | None = field(default=None, metadata=JSON_ONLY)
    precision_sd: float | None = field(default=None, metadata=JSON_ONLY)
    recall_sd: float | None = field(default=None, metadata=JSON_ONLY)
    density_sd: float | None = field(default=None, metadata=JSON_ONLY)
    coverage_sd: float | None = field(default=None, metadata=JSON_ONLY)
    seeds: str | None = field(default=None, metadata=JSON_ONLY)          # "0,1,2"
    per_seed: dict | None = field(default=None, metadata=JSON_ONLY)      # metric -> [value per seed]
    # perf rows (bench perf)
    tokens_per_s: float | None = field(default=None, metadata=JSON_ONLY)
    flops_per_image: float | None = field(default=None, metadata=JSON_ONLY)
    mfu: float | None = field(default=None, metadata=JSON_ONLY)
    speedup_vs_plain: float | None = field(default=None, metadata=JSON_ONLY)
    plain_batch: int | None = field(default=None, metadata=JSON_ONLY)
    estimate_samples: int | None = field(default=None, metadata=JSON_ONLY)
    estimate_hours: float | None = field(default=None, metadata=JSON_ONLY)
    error: str | None = field(default=None, metadata=JSON_ONLY)
    wall_s: float | None = field(default=None, metadata=JSON_ONLY)
    # published rows (bench.paper)
    source: str | None = field(default=None, metadata=JSON_ONLY)
    note: str | None = field(default=None, metadata=JSON_ONLY)
    fid_vs_steps_figure: float | None = field(default=None, metadata=JSON_ONLY)

    @property
    def key(self) -> str:
        return self.slug or self.sampler or "?"

    def as_dict(self) -> dict:
        """The fields that are set (None left out), in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d, where: str) -> "Row":
        """A stored row, every value checked: a wrong type or a non-finite number is an error naming
        the file and the key, never a number quietly carried into a table or a check."""
        if not isinstance(d, dict):
            raise BenchError(f"{where}: a row must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(FIELD_TYPES))
        if unknown:
            raise BenchError(f"{where}: unknown row key {unknown[0]!r}")
        for key, value in d.items():
            if value is None:
                continue
            kind = FIELD_TYPES[key]
            ok = (isinstance(value, dict) if kind is dict else isinstance(value, str) if kind is str else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            if not ok:
                expected = {str: "a string", int: "an integer", float: "a finite number", dict: "an object"}[kind]
                raise BenchError(f"{where}: row {d.get('slug', '?')!r}: {key} = {value!r}; expected {expected} or null")
        return cls(**d)


def _field_type(f) -> type:
    return dict if "dict" in f.type else str if "str" in f.type else int if "int" in f.type else float


FIELD_TYPES = {f.name: _field_type(f) for f in fields(Row)}
SCHEMA = [f.name for f in fields(Row) if f.metadata.get("csv", True)]
# What must match for `bench compare` and `bench check` without --allow-mismatch. The seed is not part
# of the protocol: a run with another seed is another draw of the same measurement, which is what the
# significance test judges.
PROTOCOL_KEYS = ("dataset", "dataset_content", "num_samples", "extractor", "hashes", "metrics")
# --resume also keeps the seeds, the execution switches and the plan: finished rows were sampled under
# them (compare shows differing switches per row instead of refusing). Older manifests ran plain.
RESUME_KEYS = PROTOCOL_KEYS + ("seed", "seeds", "execution", "rows", "intervals")
MANIFEST_DEFAULTS = {"execution": "plain"}


def to_csv(rows: list[Row], columns: list[str] | None = None) -> str:
    """CSV of `columns` (default: SCHEMA); unknown values empty."""
    columns = columns or SCHEMA
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow(["" if getattr(row, k) is None else getattr(row, k) for k in columns])
    return buf.getvalue()


def to_json(obj) -> str:
    def clean(v):
        if isinstance(v, Row):
            return clean(v.as_dict())
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=2) + "\n"


# ----------------------------------------------------------------------------- reading stored files

def read_json(path: Path, what: str = "file"):
    """JSON from a regular file; every way it can be bad is a BenchError naming it."""
    path = Path(path)
    try:
        if not path.is_file():
            raise BenchError(f"{what} {path} not found" if not path.exists() else f"{what} {path} is not a regular file")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{what} {path} is not valid UTF-8 JSON ({e}); it may be truncated") from None
    except OSError as e:
        raise BenchError(f"cannot read {what} {path} ({e.strerror or e})") from None


def read_manifest(path: Path) -> dict:
    m = read_json(path, "manifest")
    if not isinstance(m, dict):
        raise BenchError(f"manifest {path} must hold a JSON object")
    return m


# What tables, comparisons and checks read from a stored manifest: key -> (types, required).
MANIFEST_TYPES = {"dataset": ((str,), True), "num_samples": ((int,), True), "extractor": ((str,), True),
                  "seed": ((int, type(None)), False), "device": ((str, type(None)), False),
                  "execution": ((str,), False), "kind": ((str,), False), "reference": ((dict,), False),
                  "metrics": ((dict,), False), "hashes": ((dict,), False)}


def check_manifest(m: dict, where: str) -> None:
    for key, (types, required) in MANIFEST_TYPES.items():
        if key not in m:
            if required:
                raise BenchError(f"{where}: the manifest lacks `{key}`")
            continue
        value = m[key]
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join("null" if t is type(None) else {str: "a string", int: "an integer",
                                                                 dict: "an object"}[t] for t in types)
            raise BenchError(f"{where}: manifest `{key}` = {value!r}; expected {names}")


def load_run(path: str | Path) -> tuple[dict, list[Row]]:
    """(manifest, rows) of a finished run (a directory holding results.json, or the file itself)."""
    path = Path(path)
    f = path / "results.json" if path.is_dir() else path
    data = read_json(f, "results file")
    if not isinstance(data, dict) or not isinstance(data.get("manifest"), dict) or not isinstance(data.get("rows"), list):
        raise BenchError(f"results file {f} must hold an object with `manifest` (an object) and `rows` (a list)")
    check_manifest(data["manifest"], f"results file {f}")
    rows = [Row.from_dict(r, str(f)) for r in data["rows"]]
    for r in rows:
        if not r.slug:
            raise BenchError(f"results file {f}: a row has no `slug`")
    if len({r.slug for r in rows}) != len(rows):
        raise BenchError(f"results file {f}: two rows share a slug")
    return data["manifest"], rows


def is_published(run_dir: Path) -> bool:
    """Whether a stored run holds published numbers (bench.paper) rather than a run of this harness:
    the one rule that keeps them read-only."""
    for f, pick in ((run_dir / "results.json", lambda d: d.get("manifest", {})), (run_dir / "manifest.json", dict)):
        try:
            if pick(json.loads(f.read_text())).get("kind") == "published":
                return True
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return False


def refuse_published(run_dir: Path, what: str) -> None:
    if is_published(Path(run_dir)):
        raise BenchError(f"{run_dir} holds published numbers (manifest kind 'published'); bench never {what} "
                         f"there, not even with --force")


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


# ----------------------------------------------------------------------------- versions

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


# ----------------------------------------------------------------------------- the run store

LOCK_GRACE_SECONDS = 10.0


def _flock_soon(fd: int) -> None:
    """Take the exclusive lock, retrying for a few seconds before giving up: a killed run (under
    torchrun, its ranks are signalled when their launcher dies) frees its lock only once its processes
    have exited, which takes a moment."""
    deadline = time.monotonic() + LOCK_GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class ShardStore:
    """The finished batches of a row still being computed: its features and sample-grid images, one
    file per batch, written atomically, so a killed run resumes without recomputing them. The
    folder is removed once the row itself is written. A shard that cannot be read is recomputed."""

    def __init__(self, folder: Path, batch_size: int, before_first_write=lambda: None):
        self.folder, self.batch_size, self.before_first_write = Path(folder), batch_size, before_first_write

    def _file(self, start: int) -> Path:
        return self.folder / f"b{self.batch_size}-{start:09d}.npz"

    def load(self, start: int, expected: int, dim: int) -> tuple[np.ndarray, dict] | None:
        """The batch at `start` if a readable shard of `expected` finite feature rows of width `dim` is there."""
        f = self._file(start)
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                feats, index, images = z["features"], z["grid_index"], z["grid_images"]
        except Exception:  # noqa: BLE001 - any unreadable shard (truncated, corrupt, wrong keys) is redone
            return None
        if feats.shape != (expected, dim) or not np.isfinite(feats).all() or len(index) != len(images):
            return None
        return feats, dict(zip(index.tolist(), images))

    def save(self, start: int, features: np.ndarray, grid: dict) -> None:
        self.before_first_write()
        idx = sorted(grid)
        buf = io.BytesIO()
        np.savez(buf, features=features, grid_index=np.array(idx, dtype=np.int64),
                 grid_images=np.stack([grid[i] for i in idx]) if idx else np.zeros((0, 1, 1, 1), np.uint8))
        atomic_write_bytes(self._file(start), buf.getvalue())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class RunStore:
    """The life of one run folder: checked before anything runs, created when the first result is
    ready (so bad input found earlier leaves nothing behind), locked while a process works on it,
    resumed row by row and batch by batch, finished by writing results.json last.

    --resume continues an unfinished run whose manifest agrees on the protocol, the execution and
    the plan of rows; --force discards an existing run, finished or not, once the new run has its
    first result. The two together are refused: one keeps finished rows, the other discards them.
    """

    def __init__(self, results_dir: Path, dataset: str, run_name: str | None, resume: bool = False,
                 force: bool = False):
        if resume and force:
            raise BenchError("--resume and --force contradict each other: --resume keeps an unfinished run's rows, "
                             "--force discards the run; give one of them")
        check_plain_name(dataset, "dataset name")
        name = check_plain_name(run_name, "--run-name") if run_name is not None else time.strftime("%Y%m%d-%H%M%S")
        self.root = Path(results_dir)
        self.dir = self.root / dataset / name
        self.resume, self.force = resume, force
        self.created = False
        self._lock_fd: int | None = None
        self._lock_file = self.root / dataset / f".{name}.lock"
        self._made_dirs: list[Path] = []

    # -- before anything is computed

    def check(self, manifest: dict) -> dict[str, Row]:
        """Whether this run may be written, and the finished rows --resume keeps; writes nothing."""
        refuse_published(self.dir, "writes")
        if self.root.exists() and not self.root.is_dir():
            raise BenchError(f"results folder {self.root} is not a directory (run.results_dir in bench.toml)")
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise BenchError(f"{self.dir} exists and is not a folder (a file or a symlink); bench does not write "
                             f"through it: remove it or choose another --run-name")
        if not self.dir.exists():
            if self.resume:
                raise BenchError(f"cannot resume {self.dir}: there is no such run; drop --resume to start it")
            return {}
        finished = (self.dir / "results.json").exists()
        if self.force:
            return {}
        if finished:
            raise BenchError(f"run {self.dir} is finished; pass --force to overwrite it or choose another --run-name")
        if not self.resume:
            raise BenchError(f"run {self.dir} exists and is unfinished; pass --resume to continue it "
                             f"or --force to restart it")
        old = read_manifest(self.dir / "manifest.json")
        diff = protocol_differences(old, manifest, RESUME_KEYS)
        if diff:
            raise BenchError(f"cannot resume {self.dir}: it was started with another protocol or plan "
                             f"({'; '.join(d[:200] for d in diff)}); use a new --run-name or --force")
        return self.finished_rows()

    def finished_rows(self) -> dict[str, Row]:
        rows = {}
        for f in sorted((self.dir / "rows").glob("*.json")):
            row = Row.from_dict(read_json(f, "row file"), str(f))
            if row.slug != f.stem:
                raise BenchError(f"row file {f} holds row {row.slug!r}; expected {f.stem!r}")
            rows[row.slug] = row
        return rows

    def lock(self) -> None:
        """Hold this run's lock until release(): a second process on the same run is refused. The
        kernel drops the lock when its process dies, so a killed run never blocks the next one."""
        check_folder(self._lock_file.parent, f"the run {self.dir} (results under run.results_dir of bench.toml)")
        try:
            for parent in reversed([self._lock_file.parent, *self._lock_file.parent.parents]):
                if not parent.exists():
                    parent.mkdir()
                    self._made_dirs.append(parent)
        except OSError as e:
            self._remove_made_dirs()
            raise write_error(self._lock_file, e) from None
        while True:
            try:
                fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._remove_made_dirs()
                raise write_error(self._lock_file, e) from None
            try:
                _flock_soon(fd)
            except OSError as e:
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                self._remove_made_dirs()
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise BenchError(f"run {self.dir} is in use by process {holder}; wait for it to finish or "
                                     f"choose another --run-name") from None
                raise write_error(self._lock_file, e) from None
            try:  # the holder may have released (removed) the file between our open and flock: open anew
                if os.stat(self._lock_file).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            self._lock_file.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.created:
            self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                break
        self._made_dirs = []

    # -- writing

    def begin(self, manifest: dict, discard_old: bool = True) -> None:
        """Create the folder (discarding an old run under --force) and write the manifest; once."""
        if self.created:
            return
        if self.force and discard_old and self.dir.exists():
            shutil.rmtree(self.dir)
        try:
            (self.dir / "rows").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.dir, e) from None
        atomic_write_text(self.dir / "manifest.json", to_json(manifest))
        self.created = True

    def shards(self, slug: str, batch_size: int, before_first_write) -> ShardStore:
        return ShardStore(self.dir / "rows" / f"{slug}.shards", batch_size, before_first_write)

    def write_row(self, row: Row, grid_png: bytes | None) -> None:
        """The finished row and its sample grid (PNG bytes); its shards go."""
        if grid_png is not None:
            atomic_write_bytes(self.dir / "samples" / f"{row.slug}.png", grid_png)
        atomic_write_text(self.dir / "rows" / f"{row.slug}.json", to_json(row))
        shutil.rmtree(self.dir / "rows" / f"{row.slug}.shards", ignore_errors=True)

    def finish(self, manifest: dict, rows: list[Row], write_reports) -> None:
        """results.csv, then write_reports(run_dir, manifest, rows) (tables and figures), then results.json."""
        manifest = {**manifest, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(self.dir / "results.csv", to_csv(rows))
        write_reports(self.dir, manifest, rows)
        # last: its presence marks the run finished
        atomic_write_text(self.dir / "results.json", to_json({"manifest": manifest, "rows": rows}))

