"""bench.toml -> one typed Config; Config plus the command line -> one RunSettings, before anything runs.

Each section of bench.toml is a dataclass below: its fields are the keys it takes, their types and
defaults; `check` adds ranges. Every problem is one BenchError naming the file, the dotted key and
what was expected.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from .data import DATASET_KINDS, SOURCES
from .errors import BenchError
from .execution import Execution
from .limits import MAX_BATCH, MAX_KID_SUBSETS, MAX_REPEATS, MAX_RESOLUTION, MAX_SEED
from .paths import check_plain_name, expand_path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "bench.toml"


# ----------------------------------------------------------------------------- typed tables

_NAMES = {str: ("a string", "strings"), bool: ("true or false", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), dict: ("a table", "tables")}


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint][0]
    if origin in (list, tuple):
        return f"a list of {_NAMES[args[0]][1]}"
    if origin is dict:
        return f"a table of {_NAMES[args[1]][1]}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    return "a table"


def _coerce(value, hint):
    """value as `hint` (int accepted for float, lists become tuples), or raise ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except ValueError:
                pass
        raise ValueError
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if origin in (list, tuple):
        if isinstance(value, list):
            return tuple(_coerce(v, args[0]) for v in value)
        raise ValueError
    if origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(v, args[1]) for k, v in value.items()}
        raise ValueError
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise ValueError
    raise AssertionError(hint)


def _typed_values(cls, table, where: str, prefix: str) -> dict:
    """The keys of a TOML table that dataclass `cls` takes, converted; unknown keys and wrong types
    are errors naming `prefix.key`."""
    if not isinstance(table, dict):
        raise BenchError(f"{where}: {prefix} must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init and f.metadata.get("toml", True)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise BenchError(f"{where}: unknown key '{prefix}.{unknown[0]}'; expected one of: {', '.join(sorted(known))}")
    values = {}
    for key, value in table.items():
        try:
            values[key] = _coerce(value, hints[key])
        except ValueError:
            raise BenchError(f"{where}: {prefix}.{key} must be {_describe(hints[key])}, got {value!r}") from None
    return values


def build(cls, table, where: str, prefix: str, extra: dict | None = None):
    """An instance of dataclass `cls` from a TOML table, checked (`cls.check`): unknown keys, wrong
    types, missing required keys and values out of range are errors naming `prefix.key`."""
    values = _typed_values(cls, table, where, prefix)
    own = [f for f in fields(cls) if f.init and f.metadata.get("toml", True)]
    missing = [f.name for f in own if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BenchError(f"{where}: {prefix}.{missing[0]} is missing")
    obj = cls(**values, **(extra or {}))
    if hasattr(obj, "check"):
        obj.check(where, prefix)
    return obj


def _positive(obj, where: str, prefix: str, names: tuple[str, ...], minimum: int = 1,
              maximum: int | None = None) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            expected = "positive" if minimum == 1 else f">= {minimum}"
            raise BenchError(f"{where}: {prefix}.{name} must be {expected}, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise BenchError(f"{where}: {prefix}.{name} must be at most {maximum:,}, got {value:,}")


@dataclass(frozen=True)
class RunSection:
    dataset: str = "digits"          # what `bench run` does with no --dataset
    results_dir: str = "results"     # runs go to <results_dir>/<dataset>/<run-name>/
    seed: int = 0                    # sample i draws from a generator seeded by (seed, i)
    device: str = "cpu"
    batch_size: int = 250
    cache_dir: str = "~/.cache/bench"
    execution: str = "plain"         # speed switches (bench.execution)

    def check(self, where: str, prefix: str) -> None:
        _positive(self, where, prefix, ("batch_size",), maximum=MAX_BATCH)
        if not 0 <= self.seed <= MAX_SEED:
            raise BenchError(f"{where}: {prefix}.seed must lie in 0..{MAX_SEED}, got {self.seed}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BenchError(f"{where}: {prefix}.device must be 'cpu' or 'cuda', got {self.device!r}")
        try:
            Execution.parse(self.execution)
        except BenchError as e:
            raise BenchError(f"{where}: {prefix}.{e}") from None


@dataclass(frozen=True)
class MetricsSection:
    pr_k: int = 3                    # improved precision/recall neighbourhood
    dc_k: int = 5                    # density/coverage neighbourhood
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    inception_weights: str | None = None   # an explicit Inception weights file (bench.inception)
    cleanfid_check: bool = False           # add clean-fid's FID of the same statistics to every row
    bootstrap_resamples: int = 500         # 95% intervals of every metric (bench.stats); 0: none

    def check(self, where: str, prefix: str) -> None:
        _positive(self, where, prefix, ("pr_k", "dc_k", "kid_subset_size", "kid_subsets"))
        _positive(self, where, prefix, ("bootstrap_resamples",), 0)
        if 0 < self.bootstrap_resamples < 40:
            raise BenchError(f"{where}: {prefix}.bootstrap_resamples = {self.bootstrap_resamples} is too few for a "
                             f"95% interval; use at least 40 (500 recommended) or 0 for none")
        _positive(self, where, prefix, ("kid_subsets",), maximum=MAX_KID_SUBSETS)

    def overridden(self, overrides: dict) -> "MetricsSection":
        return MetricsSection(**{**self.__dict__, **overrides})

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DatasetMetrics:
    """Overrides of [metrics] for one dataset."""
    pr_k: int | None = None
    dc_k: int | None = None

    def check(self, where: str, prefix: str) -> None:
        _positive(self, where, prefix, ("pr_k", "dc_k"))

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class TimingSection:
    warmup: int = 1                  # untimed batches before timing
    repeats: int = 3                 # timed batches; the median is reported
    batch_size: int = 64

    def check(self, where: str, prefix: str) -> None:
        _positive(self, where, prefix, ("repeats",), maximum=MAX_REPEATS)
        _positive(self, where, prefix, ("batch_size",), maximum=MAX_BATCH)
        _positive(self, where, prefix, ("warmup",), 0, MAX_REPEATS)


@dataclass(frozen=True)
class Thresholds:
    fid_ceiling: dict[str, float] = field(default_factory=dict)  # row slug -> highest FID that passes
    fid_regression: float | None = None        # relative FID rise against the baseline that fails
    throughput_regression: float | None = None  # relative img/s drop that fails (same device only)

    def check(self, where: str, prefix: str) -> None:
        for key in ("fid_regression", "throughput_regression"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise BenchError(f"{where}: {prefix}.{key} must be >= 0, got {value}")


@dataclass(frozen=True)
class SweepEntry:
    sampler: str
    steps: tuple[int, ...] | None = None
    temperature: tuple[float, ...] = (1.0,)
    top_k: int | None = None
    top_p: float | None = None

    def check(self, where: str, prefix: str) -> None:
        from .samplers import SamplerSettings
        from .samplers.registry import sampler_class
        try:
            cls = sampler_class(self.sampler)
        except BenchError as e:
            raise BenchError(f"{where}: {prefix}.sampler: {e}") from None
        # a value the sampler would ignore is refused, never dropped while the row's label shows it
        if self.steps is not None and not cls.takes_steps:
            raise BenchError(f"{where}: {prefix}.steps: sampler {self.sampler!r} takes no steps; remove the key")
        if not cls.takes_temperature and (self.top_k, self.top_p, self.temperature) != (None, None, (1.0,)):
            raise BenchError(f"{where}: {prefix}: sampler {self.sampler!r} draws no tokens from a network; "
                             f"temperature, top_k and top_p do not apply")
        if self.steps is not None and len(set(self.steps)) != len(self.steps):
            raise BenchError(f"{where}: {prefix}.steps = {list(self.steps)} repeats a value")
        if len(set(self.temperature)) != len(self.temperature):
            raise BenchError(f"{where}: {prefix}.temperature = {list(self.temperature)} repeats a value")
        try:  # every combination is valid settings (finite, in range)
            for t in self.temperature:
                for s in self.steps or (None,):
                    SamplerSettings(self.sampler, s, t, self.top_k, self.top_p)
        except BenchError as e:
            raise BenchError(f"{where}: {prefix}: {e}") from None


@dataclass(frozen=True)
class DatasetConfig:
    """One [datasets.NAME] table. `source` holds the kind's own keys (bench.data)."""
    kind: str
    resolution: int
    channels: int
    extractor: str
    tokenizer: str
    num_samples: int = 1000
    batch_size: int | None = None
    priors: dict[str, str] = field(default_factory=dict)
    sweep: tuple[dict, ...] = ()      # as written; replaced by SweepEntry objects once checked
    official_hparams: str | dict | None = None   # official .th checkpoints: a preset or official flags
    metrics: dict = field(default_factory=dict)
    execution: str | None = None      # speed switches for this dataset; run.execution otherwise
    # kind-specific keys, gathered into `source`
    heldout_size: int | None = None   # digits
    split_seed: int | None = None     # digits
    train: str | None = None          # folder, lsun
    heldout: str | None = None        # folder, lsun
    on_corrupt: str | None = None     # folder, lsun
    name: str = field(default="", metadata={"toml": False})
    source: object = field(default=None, metadata={"toml": False})
    overrides: DatasetMetrics = field(default_factory=DatasetMetrics, metadata={"toml": False})

    def check(self, where: str, prefix: str) -> None:
        if self.kind not in DATASET_KINDS:
            raise BenchError(f"{where}: {prefix}.kind = {self.kind!r}; expected one of {DATASET_KINDS}")
        _positive(self, where, prefix, ("resolution", "channels", "num_samples", "batch_size", "heldout_size"))
        _positive(self, where, prefix, ("batch_size",), maximum=MAX_BATCH)
        _positive(self, where, prefix, ("resolution",), maximum=MAX_RESOLUTION)
        if self.channels not in (1, 3):
            raise BenchError(f"{where}: {prefix}.channels must be 1 or 3, got {self.channels}")
        for key in self.priors:
            check_plain_name(key, f"{where}: {prefix}.priors key")
        if self.execution is not None:
            try:
                Execution.parse(self.execution)
            except BenchError as e:
                raise BenchError(f"{where}: {prefix}.{e}") from None
        for key, value in (("tokenizer", self.tokenizer), *((f"priors.{k}", v) for k, v in self.priors.items())):
            if not value.strip():
                raise BenchError(f"{where}: {prefix}.{key} is empty; name a checkpoint (e.g. builtin:digits/vq)")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in ("train", "heldout") if self.source.has_split(s))


def _dataset(name: str, table: dict, where: str) -> DatasetConfig:
    prefix = f"datasets.{name}"
    check_plain_name(name, f"{where}: dataset name")
    for key in ("kind", "resolution", "channels", "extractor", "tokenizer"):
        if isinstance(table, dict) and key not in table:
            raise BenchError(f"{where}: {prefix}.{key} is missing")
    ds = build(DatasetConfig, table, where, prefix)
    source_cls = SOURCES[ds.kind]
    stray = [k for cls in SOURCES.values() for k in cls.keys if k not in source_cls.keys and getattr(ds, k) is not None]
    if stray:
        raise BenchError(f"{where}: {prefix}.{stray[0]} does not apply to kind {ds.kind!r} "
                         f"(its keys: {', '.join(source_cls.keys)})")
    options = {k: getattr(ds, k) for k in source_cls.keys if getattr(ds, k) is not None}
    source = source_cls.from_config(ds.kind, ds.resolution, ds.channels, options, where, prefix)
    if ds.official_hparams is not None:
        from .loading.official import check_hparams
        try:
            check_hparams(ds.official_hparams)
        except BenchError as e:
            raise BenchError(f"{where}: {prefix}.official_hparams: {e}") from None
    overrides = build(DatasetMetrics, ds.metrics, where, f"{prefix}.metrics")
    entries = []
    for i, entry in enumerate(ds.sweep):
        if "sampler" not in entry:
            raise BenchError(f"{where}: {prefix}.sweep[{i}].sampler is missing")
        entries.append(build(SweepEntry, entry, where, f"{prefix}.sweep[{i}]"))
    object.__setattr__(ds, "name", name)
    object.__setattr__(ds, "source", source)
    object.__setattr__(ds, "overrides", overrides)
    object.__setattr__(ds, "sweep", tuple(entries))
    return ds


@dataclass
class Config:
    path: Path
    raw: dict
    run: RunSection
    metrics: MetricsSection
    timing: TimingSection
    datasets: dict[str, DatasetConfig]
    thresholds: dict[str, Thresholds] = field(default_factory=dict)
    profile: str | None = None

    def dataset(self, name: str | None) -> DatasetConfig:
        name = self.run.dataset if name is None else name
        if name not in self.datasets:
            raise BenchError(f"unknown dataset {name!r}; {self.path} configures: {', '.join(sorted(self.datasets))}")
        return self.datasets[name]

    def execution(self, ds: DatasetConfig) -> str:
        """The speed switches a dataset runs under unless --execution says otherwise."""
        return ds.execution if ds.execution is not None else self.run.execution

    def checkpoint_ref(self, ds: DatasetConfig, value: str, key: str) -> str:
        """A tokenizer or prior of bench.toml with ${VAR} and ~ expanded; `builtin:` names as written.
        key: the dotted key under datasets.<name>, for errors (e.g. "priors.absorbing")."""
        if value.startswith("builtin:"):
            return value
        return str(expand_path(value, f"datasets.{ds.name}.{key}", str(self.path)))

    def results_dir(self) -> Path:
        return expand_path(self.run.results_dir, "run.results_dir", str(self.path))

    def cache_dir(self) -> Path:
        return expand_path(self.run.cache_dir, "run.cache_dir", str(self.path))

    def inception_weights(self) -> Path | None:
        w = self.metrics.inception_weights
        return expand_path(w, "metrics.inception_weights", str(self.path)) if w else None

    def extractor_weights(self, extractor: str) -> Path | None:
        """The weights file bench.toml names for this extractor, if any."""
        return self.inception_weights() if extractor == "inception-v3-compat" else None


TOP_LEVEL = ("run", "metrics", "timing", "datasets", "thresholds", "profiles")
SECTIONS = {"run": RunSection, "metrics": MetricsSection, "timing": TimingSection}


def _check_overlay(overlay: dict, where: str, prefix: str) -> None:
    """A profile's keys and types, named under the profile (the merged result is checked again)."""
    stray = sorted(set(overlay) - set(TOP_LEVEL) | ({"profiles"} & set(overlay)))
    if stray:
        raise BenchError(f"{where}: unknown key '{prefix}.{stray[0]}'")
    for key, cls in SECTIONS.items():
        if key in overlay:
            _typed_values(cls, overlay[key], where, f"{prefix}.{key}")
    for key in ("run", "metrics", "timing", "datasets", "thresholds"):
        if not isinstance(overlay.get(key, {}), dict):
            raise BenchError(f"{where}: {prefix}.{key} must be a table")
    for name, table in overlay.get("datasets", {}).items():
        table = dict(table) if isinstance(table, dict) else table
        sweep = table.pop("sweep", []) if isinstance(table, dict) else []
        _typed_values(DatasetConfig, table, where, f"{prefix}.datasets.{name}")
        for i, entry in enumerate(sweep if isinstance(sweep, list) else []):
            _typed_values(SweepEntry, entry, where, f"{prefix}.datasets.{name}.sweep[{i}]")


def _merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike | None = None, profile: str | None = None) -> Config:
    if path is None:  # the working directory's bench.toml, else the project's own
        path = Path("bench.toml") if Path("bench.toml").is_file() else DEFAULT_CONFIG
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise BenchError(f"config file {path} not found (or not a regular file); pass --config PATH")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BenchError(f"{where} is not UTF-8 text ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"{where} is not valid TOML: {e}") from None
    except OSError as e:
        raise BenchError(f"cannot read {where} ({e.strerror or e})") from None
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; expected one of: {', '.join(TOP_LEVEL)}")
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise BenchError(f"{where}: profiles must be tables ([profiles.NAME])")
    if profile is not None:
        if profile not in profiles:
            raise BenchError(f"unknown profile {profile!r}; {where} defines: {', '.join(sorted(profiles)) or 'none'}")
        overlay = profiles[profile]
        _check_overlay(overlay, where, f"profiles.{profile}")
        raw = _merge(raw, overlay)
        where = f"{where} with --profile {profile}"  # the merged values are checked below
    for key in ("run", "metrics", "timing", "datasets", "thresholds"):
        if not isinstance(raw.get(key, {}), dict):
            raise BenchError(f"{where}: {key} must be a table")
    datasets = {}
    for name, table in raw.get("datasets", {}).items():
        if not isinstance(table, dict):
            raise BenchError(f"{where}: datasets.{name} must be a table")
        datasets[name] = _dataset(name, table, where)
    thresholds = {name: build(Thresholds, t, where, f"thresholds.{name}")
                  for name, t in raw.get("thresholds", {}).items()}
    return Config(path=path, raw=raw, run=build(RunSection, raw.get("run", {}), where, "run"),
                  metrics=build(MetricsSection, raw.get("metrics", {}), where, "metrics"),
                  timing=build(TimingSection, raw.get("timing", {}), where, "timing"),
                  datasets=datasets, thresholds=thresholds, profile=profile)


# ----------------------------------------------------------------------------- one run's settings

@dataclass(frozen=True)
class RunSettings:
    """Everything one `bench run` uses, resolved from bench.toml and the command line."""
    config: Config
    dataset: DatasetConfig
    samplers: tuple[str, ...] | None     # --samplers: a subset of the rows, or None for all
    steps: tuple[int, ...] | None        # --steps: overrides the sweep's step counts
    num_samples: int
    seed: int
    seeds: tuple[int, ...]               # --seeds: sampled rows repeated per seed; seeds[0] == seed
    device: str
    batch_size: int
    execution: Execution
    metrics: MetricsSection              # [metrics] with the dataset's overrides
    timing: TimingSection
    results_dir: Path
    cache_dir: Path
    run_name: str | None
    resume: bool = False
    force: bool = False
    progress: bool = True


def run_settings(cfg: Config, dataset: str | None = None, samplers=None, steps=None, num_samples: int | None = None,
                 device: str | None = None, execution: str | None = None, run_name: str | None = None,
                 resume: bool = False, force: bool = False, progress: bool = True,
                 seeds=None) -> RunSettings:
    ds = cfg.dataset(dataset)
    n = ds.num_samples if num_samples is None else num_samples
    if n < 1:
        raise BenchError(f"--num-samples must be positive, got {n}")
    if run_name is not None:
        check_plain_name(run_name, "--run-name")
    seeds = tuple(seeds) if seeds else (cfg.run.seed,)
    if len(set(seeds)) != len(seeds) or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise BenchError(f"--seeds {','.join(map(str, seeds))}: expected distinct integers in 0..{MAX_SEED}")
    from .checkpoints import check_folder
    cache_dir = cfg.cache_dir()
    check_folder(cache_dir, f"the cache {cache_dir} (run.cache_dir of {cfg.path})")
    return RunSettings(
        config=cfg, dataset=ds, samplers=tuple(samplers) if samplers is not None else None,
        steps=tuple(steps) if steps is not None else None, num_samples=n,
        seed=seeds[0], seeds=seeds, device=device or cfg.run.device,
        batch_size=ds.batch_size or cfg.run.batch_size, execution=Execution.parse(execution or cfg.execution(ds)),
        metrics=cfg.metrics.overridden(ds.overrides.as_dict()), timing=cfg.timing,
        results_dir=cfg.results_dir(), cache_dir=cache_dir, run_name=run_name, resume=resume, force=force,
        progress=progress)
