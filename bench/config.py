"""bench.toml: loading, profile overlays and validation.

Every problem is reported as one BenchError naming the file, the dotted key and what was expected.
"""
from __future__ import annotations

import copy
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BenchError
from .execution import Execution

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "bench.toml"

# Schema: key -> type, nested dict for tables, "*" for named entries, [dict] for arrays of tables.
# Types: str, int, float (ints accepted), bool, "ints", "floats", "strs" (lists), "table:str",
# "str|table" (a string or a table, e.g. a preset name or its flags).
SWEEP_SCHEMA = {"sampler": str, "steps": "ints", "temperature": "floats", "top_k": int, "top_p": float}
DATASET_SCHEMA = {
    "kind": str, "resolution": int, "channels": int, "extractor": str, "num_samples": int,
    "batch_size": int, "tokenizer": str, "priors": "table:str", "sweep": [SWEEP_SCHEMA],
    "heldout_size": int, "split_seed": int,          # digits
    "train": str, "heldout": str, "on_corrupt": str,  # folder, lsun
    "official_hparams": "str|table",                 # official .th checkpoints: a preset or official flags
    "metrics": {"pr_k": int, "dc_k": int},           # overrides of [metrics] for this dataset
}
THRESHOLD_SCHEMA = {"fid_ceiling": "table:float", "fid_regression": float, "throughput_regression": float}
SCHEMA = {
    "run": {"dataset": str, "results_dir": str, "seed": int, "device": str, "batch_size": int,
            "cache_dir": str, "execution": str},   # execution: speed switches (bench.execution)
    "metrics": {"pr_k": int, "dc_k": int, "kid_subset_size": int, "kid_subsets": int,
                "inception_weights": str,   # bench.inception: an explicit Inception weights file
                "cleanfid_check": bool},    # add clean-fid's FID of the same statistics to every row
    "timing": {"warmup": int, "repeats": int, "batch_size": int},
    "datasets": {"*": DATASET_SCHEMA},
    "thresholds": {"*": THRESHOLD_SCHEMA},
    "profiles": {"*": dict},  # overlays, validated after merging
}
REQUIRED_DATASET_KEYS = ("kind", "resolution", "channels", "extractor", "tokenizer")


def _type_name(t) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            "ints": "a list of integers", "floats": "a list of numbers", "strs": "a list of strings",
            "table:str": "a table of strings", "table:float": "a table of numbers",
            "str|table": "a string or a table"}.get(t, "a table")


def _check_value(value, t) -> bool:
    is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if t is str:
        return isinstance(value, str)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return is_num(value)
    if t is bool:
        return isinstance(value, bool)
    if t == "ints":
        return isinstance(value, list) and all(_check_value(v, int) for v in value)
    if t == "floats":
        return isinstance(value, list) and all(is_num(v) for v in value)
    if t == "table:str":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if t == "table:float":
        return isinstance(value, dict) and all(is_num(v) for v in value.values())
    if t is dict:
        return isinstance(value, dict)
    if t == "str|table":
        return isinstance(value, (str, dict))
    raise AssertionError(t)


def validate(tree: dict, schema: dict, where: str, prefix: str = "") -> None:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        expected = schema.get(key, schema.get("*"))
        if expected is None:
            known = ", ".join(sorted(k for k in schema if k != "*"))
            raise BenchError(f"{where}: unknown key {dotted!r}; expected one of: {known}")
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise BenchError(f"{where}: {dotted} must be a table")
            validate(value, expected, where, dotted + ".")
        elif isinstance(expected, list):
            if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                raise BenchError(f"{where}: {dotted} must be an array of tables ([[{dotted}]])")
            for i, item in enumerate(value):
                validate(item, expected[0], where, f"{dotted}[{i}].")
        elif not _check_value(value, expected):
            raise BenchError(f"{where}: {dotted} must be {_type_name(expected)}, got {value!r}")


def _merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_path(value: str, key: str, where: str) -> Path:
    """Expand ${VAR} and ~; an unset variable is an error naming it."""
    def sub(m):
        name = m.group(1)
        if name not in os.environ:
            raise BenchError(f"{where}: {key} = {value!r} uses ${{{name}}}, which is not set; "
                             f"export {name}=/path/to/data or write the path into {where}")
        return os.environ[name]
    return Path(os.path.expanduser(_ENV.sub(sub, value)))


@dataclass(frozen=True)
class SweepEntry:
    sampler: str
    steps: tuple[int, ...] | None
    temperatures: tuple[float, ...]
    top_k: int | None = None
    top_p: float | None = None


@dataclass
class DatasetConfig:
    name: str
    kind: str
    resolution: int
    channels: int
    extractor: str
    tokenizer: str
    num_samples: int
    priors: dict[str, str]
    sweep: list[SweepEntry]
    source: dict            # options for bench.data.open_images, minus the path
    splits: dict[str, str]  # split -> path as written (folder, lsun); empty for digits
    batch_size: int | None = None
    official_hparams: str | dict | None = None  # for official .th checkpoints (bench.official)
    metrics: dict = field(default_factory=dict)  # overrides of Config.metrics for this dataset


@dataclass
class Config:
    path: Path
    raw: dict
    run: dict
    metrics: dict
    timing: dict
    datasets: dict[str, DatasetConfig]
    thresholds: dict = field(default_factory=dict)
    profile: str | None = None

    def dataset(self, name: str | None) -> DatasetConfig:
        name = name or self.run["dataset"]
        if name not in self.datasets:
            raise BenchError(f"unknown dataset {name!r}; {self.path} configures: {', '.join(sorted(self.datasets))}")
        return self.datasets[name]


RUN_DEFAULTS = {"dataset": "digits", "results_dir": "results", "seed": 0, "device": "cpu", "batch_size": 250,
                "cache_dir": "~/.cache/bench", "execution": "plain"}
METRIC_DEFAULTS = {"pr_k": 3, "dc_k": 5, "kid_subset_size": 1000, "kid_subsets": 100}
TIMING_DEFAULTS = {"warmup": 1, "repeats": 3, "batch_size": 64}
DATASET_KINDS = ("digits", "folder", "lsun")
ON_CORRUPT = ("error", "skip")


def _dataset(name: str, d: dict, where: str) -> DatasetConfig:
    for key in REQUIRED_DATASET_KEYS:
        if key not in d:
            raise BenchError(f"{where}: datasets.{name}.{key} is missing")
    if d["kind"] not in DATASET_KINDS:
        raise BenchError(f"{where}: datasets.{name}.kind = {d['kind']!r}; expected one of {DATASET_KINDS}")
    if d["kind"] != "digits" and "train" not in d:
        raise BenchError(f"{where}: datasets.{name}.train (the path of the reference split) is missing")
    if d.get("on_corrupt", "error") not in ON_CORRUPT:
        raise BenchError(f"{where}: datasets.{name}.on_corrupt must be one of {ON_CORRUPT}")
    for key in ("resolution", "channels", "num_samples", "batch_size"):
        if key in d and d[key] < 1:
            raise BenchError(f"{where}: datasets.{name}.{key} must be positive, got {d[key]}")
    for key, value in d.get("metrics", {}).items():
        if value < 1:
            raise BenchError(f"{where}: datasets.{name}.metrics.{key} must be positive, got {value}")
    if "official_hparams" in d:
        from .official import check_hparams
        try:
            check_hparams(d["official_hparams"])
        except BenchError as e:
            raise BenchError(f"{where}: datasets.{name}.official_hparams: {e}") from None
    sweep = []
    for i, s in enumerate(d.get("sweep", [])):
        if "sampler" not in s:
            raise BenchError(f"{where}: datasets.{name}.sweep[{i}].sampler is missing")
        if any(v < 1 for v in s.get("steps", [])) or any(v < 0 for v in s.get("temperature", [])):
            raise BenchError(f"{where}: datasets.{name}.sweep[{i}]: steps must be >= 1 and temperatures >= 0")
        sweep.append(SweepEntry(s["sampler"], tuple(s["steps"]) if "steps" in s else None,
                                tuple(float(t) for t in s.get("temperature", [1.0])),
                                s.get("top_k"), s.get("top_p")))
    if d["kind"] == "digits":
        source = {"resolution": d["resolution"], "heldout_size": d.get("heldout_size", 500),
                  "split_seed": d.get("split_seed", 0)}
        splits = {}
    else:
        source = {"resolution": d["resolution"], "channels": d["channels"], "on_corrupt": d.get("on_corrupt", "error")}
        splits = {k: d[k] for k in ("train", "heldout") if k in d}
    return DatasetConfig(name=name, kind=d["kind"], resolution=d["resolution"], channels=d["channels"],
                         extractor=d["extractor"], tokenizer=d["tokenizer"],
                         num_samples=d.get("num_samples", 1000), priors=dict(d.get("priors", {})),
                         sweep=sweep, source=source, splits=splits, batch_size=d.get("batch_size"),
                         official_hparams=d.get("official_hparams"), metrics=dict(d.get("metrics", {})))


def load_config(path: str | os.PathLike | None = None, profile: str | None = None) -> Config:
    if path is None:  # the working directory's bench.toml, else the project's own
        path = Path("bench.toml") if Path("bench.toml").is_file() else DEFAULT_CONFIG
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise BenchError(f"config file {path} not found; pass --config PATH")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"{where} is not valid TOML: {e}") from None
    validate(raw, SCHEMA, where)
    if profile is not None:
        profiles = raw.get("profiles", {})
        if profile not in profiles:
            raise BenchError(f"unknown profile {profile!r}; {where} defines: {', '.join(sorted(profiles)) or 'none'}")
        try:
            validate(profiles[profile], {k: v for k, v in SCHEMA.items() if k != "profiles"}, where, f"profiles.{profile}.")
        except BenchError:
            raise
        raw = _merge({k: v for k, v in raw.items() if k != "profiles"}, profiles[profile])
    datasets = {name: _dataset(name, d, where) for name, d in raw.get("datasets", {}).items()}
    run = {**RUN_DEFAULTS, **raw.get("run", {})}
    metrics = {**METRIC_DEFAULTS, **raw.get("metrics", {})}
    timing = {**TIMING_DEFAULTS, **raw.get("timing", {})}
    for section, values in (("run", run), ("metrics", metrics), ("timing", timing)):
        for k, v in values.items():
            if isinstance(v, int) and not isinstance(v, bool) and v < (0 if k in ("seed", "warmup") else 1):
                raise BenchError(f"{where}: {section}.{k} must be positive, got {v}")
    if run["device"] not in ("cpu", "cuda") and not run["device"].startswith("cuda:"):
        raise BenchError(f"{where}: run.device must be 'cpu' or 'cuda', got {run['device']!r}")
    try:
        Execution.parse(run["execution"])
    except BenchError as e:
        raise BenchError(f"{where}: run.{e}") from None
    return Config(path=path, raw=raw, run=run, metrics=metrics, timing=timing, datasets=datasets,
                  thresholds=raw.get("thresholds", {}), profile=profile)


def checkpoint_path(cfg: Config, ds: DatasetConfig, value: str, key: str) -> str:
    """A tokenizer or prior of bench.toml with ${VAR} and ~ expanded; `builtin:` names as written.
    key: the dotted key under datasets.<name>, for errors (e.g. "priors.absorbing")."""
    if value.startswith("builtin:"):
        return value
    return str(expand_path(value, f"datasets.{ds.name}.{key}", str(cfg.path)))


def dataset_path(cfg: Config, ds: DatasetConfig, split: str) -> Path:
    """The resolved path of a folder/LSUN split, or an error naming the key to set."""
    if split not in ds.splits:
        raise BenchError(f"{cfg.path}: datasets.{ds.name}.{split} is not set; add the path of its {split} split")
    return expand_path(ds.splits[split], f"datasets.{ds.name}.{split}", str(cfg.path))
