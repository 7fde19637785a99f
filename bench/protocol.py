"""One run of the protocol: reference features, control rows, sampler rows, timing, results.

    data -> tokenizer -> prior + sampler -> tokens -> decode -> uint8 images
         -> features -> metrics vs reference -> rows -> results

`run(settings)` takes one resolved RunSettings (bench.config.run_settings); every input is loaded
and checked before the run folder is touched.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import distributed, report
from .checkpoints import atomic_write_bytes
from .config import Config, DatasetConfig, RunSettings
from .data import HashCache, iterate_batches
from .errors import BenchError
from .execution import Execution, check_device
from .features import Extractor, extract_features, load_extractor
from .loading import PRIOR_KINDS, Prior, Tokenizer, load_prior, load_tokenizer
from .metrics import cleanfid_cross_check, compute_metrics, min_samples
from .stats import METRICS, Reference, bootstrap_intervals, bootstrap_method, summarise_repeats
from .results import Row, RunStore, ShardStore, git_commit, versions
from .samplers import SampleNoise, Sampler, SamplerSettings
from .samplers.registry import SAMPLERS, make_sampler, sampler_class
from .timing import device_name, time_phases

HELDOUT_ROWS = ("data", "reconstruction")   # held-out real images, and through the dataset's tokenizer
GRID_SIZE = 64
MAX_SAMPLES = 10_000_000   # features of one row are held in memory: 10M x 2048 float64 is 160 GB already


# ----------------------------------------------------------------------------- models

def load_models(cfg: Config, ds: DatasetConfig, device, kinds) -> tuple[Tokenizer, dict[str, Prior]]:
    """The dataset's tokenizer and its priors of `kinds`, each checked against the tokenizer that
    decodes its samples. -> (tokenizer, {kind: prior})."""
    tokenizer = load_tokenizer(cfg.checkpoint_ref(ds, ds.tokenizer, "tokenizer"), ds.official_hparams)
    tokenizer.check_images(ds.resolution, ds.channels, ds.name)
    priors = {}
    for kind in kinds:
        if kind not in ds.priors:
            raise BenchError(f"{cfg.path}: datasets.{ds.name}.priors.{kind} is not set; a requested sampler needs it")
        prior = load_prior(cfg.checkpoint_ref(ds, ds.priors[kind], f"priors.{kind}"), kind, ds.official_hparams)
        own = prior.tokenizer
        if own is not None:
            own.check_images(ds.resolution, ds.channels, ds.name)
        prior.check_fits(own or tokenizer)
        priors[kind] = prior.to(device)
    return tokenizer.to(device), priors


@dataclass
class Pipeline:
    """Everything a run's rows need, loaded and checked once."""
    settings: RunSettings
    device: torch.device
    tokenizer: Tokenizer            # the dataset's
    priors: dict[str, Prior]
    extractor: Extractor
    train: object
    heldout: object | None
    hashes: dict
    dist: distributed.Dist = distributed.SINGLE   # torchrun: this process's rank (bench.distributed)
    content: dict = field(default_factory=dict)   # split -> content id (file bytes hashed, bench.data)
    hash_cache: HashCache | None = None
    samplers: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)   # see shared_timing

    @property
    def ds(self) -> DatasetConfig:
        return self.settings.dataset

    def sampler(self, name: str) -> Sampler:
        if name not in self.samplers:
            self.samplers[name] = make_sampler(name, self.priors, self.tokenizer, self.settings.execution)
        return self.samplers[name]

    def heldout_tokenizer(self, row: str) -> Tokenizer | None:
        """The tokenizer a held-out control row goes through: none for `data`, the dataset's for
        `reconstruction`, a prior's own for `reconstruction-<kind>`."""
        if row == "data":
            return None
        if row == "reconstruction":
            return self.tokenizer
        return self.priors[row.removeprefix("reconstruction-")].tokenizer


def load_pipeline(settings: RunSettings, plan: list["PlannedRow"], dist=distributed.SINGLE) -> Pipeline:
    """Load and check every input before anything is written."""
    cfg, ds = settings.config, settings.dataset
    device = torch.device(settings.device)
    settings.execution.check_device(device)
    check_device(device)
    train = ds.source.open("train")
    heldout = ds.source.open("heldout") if ds.source.has_split("heldout") else None
    if train.resolution != ds.resolution or train.channels != ds.channels:
        raise BenchError(f"dataset {ds.name}: images are {train.resolution}px x {train.channels} channels, "
                         f"config says {ds.resolution}px x {ds.channels}")
    if heldout is None and any(p.settings is None for p in plan):
        raise BenchError(f"rows {', '.join(p.slug for p in plan if p.settings is None)} need a held-out split: "
                         f"set datasets.{ds.name}.heldout in {cfg.path}")
    kinds = {p.prior_kind for p in plan} - {None}
    tokenizer, priors = load_models(cfg, ds, device, sorted(kinds))
    extractor = load_extractor(ds.extractor, str(device), weights_path=cfg.extractor_weights(ds.extractor))
    hashes = {"tokenizer": tokenizer.sha256, **{k: p.sha256 for k, p in priors.items()},
              "extractor": extractor.weights_sha256}
    hash_cache = HashCache(settings.cache_dir / "content-hashes.json")
    content = {split: images.content_id(hash_cache) for split, images in (("train", train), ("heldout", heldout))
               if images is not None}
    pipe = Pipeline(settings, device, tokenizer, priors, extractor, train, heldout, hashes, dist, content, hash_cache)
    for p in plan:  # every sampled row's settings fit its sampler (steps within the token count, ...)
        if p.settings is not None:
            pipe.sampler(p.settings.sampler).check(p.settings)
    check_sample_counts(pipe, plan)
    return pipe


def check_sample_counts(pipe: Pipeline, plan: list[PlannedRow]) -> None:
    """Enough samples in every row, and in the reference, for every metric: said before anything runs."""
    s, ds = pipe.settings, pipe.ds
    need = min_samples(s.metrics.as_dict())
    if s.num_samples < need:
        raise BenchError(f"--num-samples {s.num_samples} is too few: the metrics need at least {need} samples per row "
                         f"(precision/recall with k = {s.metrics.pr_k}, density/coverage with k = {s.metrics.dc_k})")
    if s.num_samples > MAX_SAMPLES:
        raise BenchError(f"--num-samples {s.num_samples} is more than one run handles ({MAX_SAMPLES:,}); "
                         f"the paper's protocol uses 50,000")
    if len(pipe.train) < need:
        raise BenchError(f"dataset {ds.name}: the reference split holds {len(pipe.train)} images; the metrics "
                         f"need at least {need}")
    if pipe.heldout is not None and any(p.settings is None for p in plan) and len(pipe.heldout) < need:
        raise BenchError(f"dataset {ds.name}: the held-out split holds {len(pipe.heldout)} images; the data and "
                         f"reconstruction rows need at least {need}")


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PlannedRow:
    slug: str
    settings: SamplerSettings | None   # None: a held-out control row (data, reconstruction[-kind])
    prior_kind: str | None = None      # the prior the row needs loaded

    def as_dict(self) -> dict:
        return self.settings.as_dict() if self.settings is not None else {"sampler": self.slug}


def plan_rows(ds: DatasetConfig, samplers=None, steps=None) -> list[PlannedRow]:
    """Control rows, then the sweep of bench.toml: every entry at each of its temperatures and (for
    samplers with steps) step counts. samplers: a subset of row names; steps: override the sweep's."""
    sweep = []
    for entry in ds.sweep:
        cls = sampler_class(entry.sampler)
        entry_steps = [None]
        if cls.takes_steps:
            entry_steps = list(steps or entry.steps or [])
            if not entry_steps:
                raise BenchError(f"datasets.{ds.name}.sweep: sampler {entry.sampler!r} takes steps; give `steps`")
        for t in entry.temperature:
            for s in entry_steps:
                sweep.append(cls.settings(s, t, entry.top_k, entry.top_p))
    priors_used = {sampler_class(s.sampler).prior_kind for s in sweep}
    own_reconstructions = [kind for kind in sorted(priors_used - {None})
                           if kind in PRIOR_KINDS and PRIOR_KINDS[kind].brings_tokenizer]
    # every run has the control rows: held-out images as they are and through each tokenizer, and
    # the control samplers (random codes)
    controls = [PlannedRow(name, None) for name in HELDOUT_ROWS]
    controls += [PlannedRow(f"reconstruction-{kind}", None, kind) for kind in own_reconstructions]
    controls += [PlannedRow(cls.settings().slug(), cls.settings()) for cls in SAMPLERS.values() if cls.control]
    sampled = [PlannedRow(s.slug(), s, sampler_class(s.sampler).prior_kind) for s in sweep]
    plan = controls + sampled
    if samplers is not None:
        names = {p.settings.sampler if p.settings is not None else p.slug for p in plan}
        unknown = [s for s in samplers if s not in names]
        if unknown:
            raise BenchError(f"--samplers {','.join(unknown)}: not in the sweep of dataset {ds.name} "
                             f"(it has: {', '.join(sorted(names))})")
        plan = [p for p in plan if (p.settings.sampler if p.settings is not None else p.slug) in samplers]
    slugs = [p.slug for p in plan]
    repeated = sorted({s for s in slugs if slugs.count(s) > 1})
    if repeated:
        raise BenchError(f"datasets.{ds.name}.sweep gives row {repeated[0]!r} twice; each configuration once")
    if not plan:
        raise BenchError("nothing to run: the sweep and --samplers select no rows")
    return plan


# ----------------------------------------------------------------------------- reference

def reference_key(pipe: Pipeline) -> str:
    ds = pipe.ds
    parts = {"dataset": ds.name, "content": pipe.content["train"], "split": "train",
             "resolution": ds.resolution, "channels": ds.channels, "preprocessing": ds.source.preprocessing,
             "extractor": pipe.extractor.name, "extractor_sha256": pipe.extractor.weights_sha256,
             "count": len(pipe.train)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def reference_features(pipe: Pipeline, progress: bool) -> tuple[np.ndarray, str]:
    """Features of the whole training split, cached under a key of everything that changes them.
    A cache file that cannot be read or has the wrong shape is recomputed."""
    key = reference_key(pipe)
    cache = pipe.settings.cache_dir / "reference" / f"{pipe.ds.name}-{key}.npy"
    if cache.is_file():
        try:
            feats = np.load(cache, allow_pickle=False)
            if feats.shape == (len(pipe.train), pipe.extractor.dim) and np.isfinite(feats).all():
                return feats, key
        except (OSError, ValueError, EOFError):
            pass
    feats = extract_features(pipe.extractor, iterate_batches(pipe.train, pipe.settings.batch_size),
                             total=len(pipe.train), desc=f"reference features ({pipe.ds.name} train)",
                             progress=progress)
    buf = io.BytesIO()
    np.save(buf, feats)
    atomic_write_bytes(cache, buf.getvalue())
    return feats, key


# ----------------------------------------------------------------------------- rows

def _sampled_features(pipe: Pipeline, sampler: Sampler, settings: SamplerSettings, seed: int, grid: dict,
                      starts: list[int], shards: ShardStore | None, label: str, progress: bool) -> np.ndarray:
    """Features of the batches starting at `starts` (all of 0, B, 2B, ... < n, or this rank's share),
    each batch sampled with `seed`, decoded by the sampler's tokenizer and extracted, or read back from
    a shard an interrupted run finished. grid: sample index -> image, for the indices below GRID_SIZE."""
    n, batch = pipe.settings.num_samples, pipe.settings.batch_size
    out = []
    total = sum(min(batch, n - s) for s in starts)
    with tqdm(total=total, desc=label, unit="img", disable=not progress, leave=False) as bar:
        for start in starts:
            size = min(batch, n - start)
            done = shards.load(start, size, pipe.extractor.dim) if shards is not None else None
            if done is None:
                idx = range(start, start + size)
                with torch.no_grad():
                    tokens = sampler.sample(SampleNoise(seed, idx, pipe.device), settings)
                images = sampler.tokenizer.decode(tokens)
                done = pipe.extractor(images), {i: img for i, img in zip(idx, images) if i < GRID_SIZE}
                if shards is not None:
                    shards.save(start, *done)
            out.append(done[0])
            grid.update(done[1])
            bar.update(len(done[0]))
    return np.concatenate(out) if out else np.zeros((0, pipe.extractor.dim))


def _heldout_batches(pipe: Pipeline, row: str, grid: dict) -> Iterator[np.ndarray]:
    tokenizer = pipe.heldout_tokenizer(row)
    seen = 0
    for images in iterate_batches(pipe.heldout, pipe.settings.batch_size):
        if tokenizer is not None:
            images = tokenizer.reconstruct(images)
        grid.update((seen + j, img) for j, img in enumerate(images[:max(0, GRID_SIZE - seen)]))
        seen += len(images)
        yield images


def time_sampler(pipe: Pipeline, sampler: Sampler, settings: SamplerSettings) -> dict:
    t, seed = pipe.settings.timing, pipe.settings.seed

    def sample():
        with torch.no_grad():
            return sampler.sample(SampleNoise(seed, range(t.batch_size), pipe.device), settings)

    times = time_phases(sample, sampler.tokenizer.decode, pipe.extractor, t.batch_size, t.warmup, t.repeats,
                        pipe.device)
    return {**times, "passes_per_image": sampler.passes_per_image}


def shared_timing(pipe: Pipeline, sampler: Sampler, settings: SamplerSettings, slug: str) -> dict:
    """time_sampler, once per sampler configuration up to the temperature: dividing the logits by
    another temperature costs the same (the argmax of temperature 0 does not, so it is timed apart).
    A row that reuses another's timing names it in `timed_with`."""
    key = (settings.sampler, settings.steps, settings.top_k, settings.top_p, settings.temperature == 0)
    if key not in pipe.timings:
        pipe.timings[key] = (slug, time_sampler(pipe, sampler, settings))
    timed_by, timing = pipe.timings[key]
    return {**timing, "timed_with": None if timed_by == slug else timed_by}


def _scored(pipe: Pipeline, feats: np.ndarray, ref: np.ndarray, reference, seed: int) -> dict:
    """Every metric of one set of features, with its bootstrap interval where the run asks for one."""
    s = pipe.settings
    # the reference is the training split, so memorisation is measured against what the models saw
    metrics = compute_metrics(feats, ref, {**s.metrics.as_dict(), "seed": seed, "memorisation": True})
    if s.metrics.cleanfid_check:
        metrics["fid_cleanfid"] = cleanfid_cross_check(feats, ref)["fid_cleanfid"]
    if reference is not None:
        metrics.update(bootstrap_intervals(feats, reference, {**s.metrics.as_dict(), "seed": seed},
                                           resamples=s.metrics.bootstrap_resamples, seed=seed,
                                           device=pipe.device, point=metrics))
    return metrics


def _over_seeds(per_seed: list[dict], seeds: tuple[int, ...]) -> dict:
    """One row's metrics from independent repeats: each metric's mean, its SD, the t interval of the
    mean (bench.stats.summarise_repeats) and every seed's value."""
    out = {k: float(np.mean([m[k] for m in per_seed])) for k, v in per_seed[0].items()
           if isinstance(v, float) and not k.endswith(("_ci_low", "_ci_high", "_se"))}
    out["kid_subset_size"] = per_seed[0]["kid_subset_size"]
    for m in METRICS:
        summary = summarise_repeats([r[m] for r in per_seed])
        out.update({m: summary["mean"], f"{m}_sd": summary["sd"], f"{m}_ci_low": summary["ci_low"],
                    f"{m}_ci_high": summary["ci_high"]})
    out.update(n_seeds=len(seeds), seeds=",".join(map(str, seeds)),
               per_seed={m: [r[m] for r in per_seed] for m in METRICS})
    return out


def score_row(pipe: Pipeline, planned: PlannedRow, ref: np.ndarray, progress: bool, store: RunStore | None = None,
              before_first_write=lambda: None, reference=None) -> tuple[Row | None, np.ndarray | None]:
    """-> (row, sample grid images). A sampled row is repeated for every seed of the run (--seeds);
    control rows once. Under torchrun a sampled row is sharded (bench.distributed): ranks other than 0
    get (None, None). reference: a bench.stats.Reference for the bootstrap intervals, or None."""
    s = pipe.settings
    grid: dict = {}
    row = Row(dataset=pipe.ds.name, sampler=planned.slug, features=pipe.extractor.name,
              device=device_name(pipe.device), dtype="float32", switches="plain", slug=planned.slug,
              label=planned.slug)
    if planned.settings is None:
        through = pipe.heldout_tokenizer(planned.slug)
        row.tokenizer = through.name if through is not None else None
        feats = extract_features(pipe.extractor, _heldout_batches(pipe, planned.slug, grid),
                                 total=len(pipe.heldout), desc=planned.slug, progress=progress)
        row = Row(**{**row.__dict__, "n_samples": len(feats), **_scored(pipe, feats, ref, reference, s.seeds[0])})
        return row, np.stack([grid[i] for i in sorted(grid)])
    settings = planned.settings
    sampler = pipe.sampler(settings.sampler)
    seeds = s.seeds[:1] if sampler.control else s.seeds
    starts = pipe.dist.my_batches(range(0, s.num_samples, s.batch_size))  # all batches in one process
    indices = np.array([i for b in starts for i in range(b, min(b + s.batch_size, s.num_samples))], dtype=np.int64)
    row = Row(**{**row.__dict__, **settings.as_dict(), "label": settings.label(), "seed": seeds[0],
                 "nfe": sampler.nfe(settings), "execution": sampler.execution(),
                 "switches": sampler.options.spec(), "dtype": sampler.options.dtype,
                 "tokenizer": sampler.tokenizer.name})
    per_seed = []
    for seed in seeds:
        shards = None
        if store is not None:
            name = planned.slug if seed == seeds[0] else f"{planned.slug}.seed{seed}"
            shards = store.shards(name, s.batch_size, before_first_write)
        seed_grid = grid if seed == seeds[0] else {}
        feats = _sampled_features(pipe, sampler, settings, seed, seed_grid, starts, shards, row.label, progress)
        feats, seed_grid = distributed.gather_in_order(pipe.dist, indices, feats, seed_grid)  # as is in one process
        if feats is None:
            continue  # not rank 0: metrics, timing and writing are rank 0's
        if seed == seeds[0]:
            grid = seed_grid
        per_seed.append(_scored(pipe, feats, ref, reference if len(seeds) == 1 else None, seed))
    if not per_seed:
        return None, None
    metrics = per_seed[0] if len(seeds) == 1 else _over_seeds(per_seed, seeds)
    timing = shared_timing(pipe, sampler, settings, planned.slug)
    row = Row(**{**row.__dict__, "n_samples": s.num_samples, **metrics, **timing})
    return row, np.stack([grid[i] for i in sorted(grid)])


# ----------------------------------------------------------------------------- the run

def intervals_method(s: RunSettings) -> dict:
    """How the run's 95% intervals are made, for its manifest."""
    resamples = s.metrics.bootstrap_resamples
    boot = bootstrap_method(resamples, s.seed) if resamples else {"method": "none (metrics.bootstrap_resamples = 0)"}
    if len(s.seeds) == 1:
        return boot
    return {"method": f"sampled rows: t interval of the mean over {len(s.seeds)} seeds; control rows: as `control`",
            "level": 0.95, "control": boot}


def build_manifest(pipe: Pipeline, plan: list[PlannedRow]) -> dict:
    s, ds = pipe.settings, pipe.ds
    cfg = s.config
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config_file": str(cfg.path),
        "profile": cfg.profile,
        "config": cfg.raw,
        "dataset": ds.name,
        "dataset_content": pipe.content["train"],
        "heldout_content": pipe.content.get("heldout"),
        # images or records dropped as undecodable (on_corrupt = "skip"), per split
        "skipped": {split: len(getattr(data, "skipped", [])) for split, data in
                    (("train", pipe.train), ("heldout", pipe.heldout)) if data is not None},
        "num_samples": s.num_samples,
        "seed": s.seed,
        "seeds": list(s.seeds),
        "seeding": "sample i draws from its own generator seeded by numpy SeedSequence([seed, i]); with several "
                   "seeds every sampled row is repeated per seed (control rows use the first)",
        "intervals": intervals_method(s),
        "extractor": pipe.extractor.name,
        "hashes": pipe.hashes,
        "metrics": {k: v for k, v in s.metrics.as_dict().items() if v not in (None, False)},
        "timing": {**asdict(s.timing), "peak_mem_mb": "cuda: max allocated; cpu: process peak RSS (high-water mark)"},
        "rows": [p.as_dict() for p in plan],
        "device": device_name(pipe.device),
        "execution": s.execution.spec(),  # speed switches asked for; each row says which applied
        "versions": versions(),
        "git": git_commit(),
        "dataset_config": {k: v for k, v in asdict(ds).items()
                           if k not in ("sweep", "source", "overrides", "name") and v is not None},
    }
    if pipe.dist.sharded:
        manifest["distributed"] = {"world_size": pipe.dist.world_size, "sharding": "whole batches, round-robin"}
    return manifest


def run(settings: RunSettings) -> Path:
    plan = plan_rows(settings.dataset, settings.samplers, settings.steps)
    # torchrun: join the process group; every rank checks the same input, rank 0 alone writes
    dist = distributed.init(settings.device)
    settings = _on_rank(settings, dist)
    main = dist.is_main
    pipe = load_pipeline(settings, plan, dist)
    manifest = build_manifest(pipe, plan)
    store = RunStore(settings.results_dir, settings.dataset.name, settings.run_name, settings.resume, settings.force)
    if main:
        store.lock()
    try:
        done = store.check(manifest)
        distributed.barrier(dist)  # every rank has checked the run directory before rank 0 creates it
        if dist.sharded and not settings.resume:
            # created now, before any rank writes shards into it: other ranks sample while rank 0
            # computes the reference, and a run killed then must still have its manifest to resume
            if main:
                store.begin(manifest)
            distributed.barrier(dist)
        _run_rows(pipe, plan, manifest, store, done, main, settings.progress and main)
    finally:
        if main:
            store.release()
    distributed.finish(dist)
    return store.dir


def _on_rank(settings: RunSettings, dist) -> RunSettings:
    from dataclasses import replace
    return replace(settings, device=dist.device(settings.device))


def _run_rows(pipe: Pipeline, plan: list[PlannedRow], manifest: dict, store: RunStore, done: dict,
              main: bool, progress: bool) -> None:
    ref, ref_key = reference_features(pipe, progress) if main else (None, None)
    if main and pipe.hash_cache is not None:
        pipe.hash_cache.save()  # once the training split has been read whole: a bad image leaves no cache
    if main:
        manifest["reference"] = {"key": ref_key, "count": int(len(ref)), "split": "train"}
    if done or store.resume:
        store.created = True  # resuming: the folder and its manifest are there

    def before_first_write():
        # one process: the folder appears with the first result, so --force discards the old run only
        # then; a sharded run was created in run() already (begin does nothing twice)
        if main:
            store.begin(manifest)

    s = pipe.settings
    reference = None
    if main and s.metrics.bootstrap_resamples:
        reference = Reference(ref, s.metrics.as_dict(), device=pipe.device)

    rows = []
    for planned in tqdm(plan, desc=f"rows ({pipe.ds.name})", unit="row", disable=not progress):
        if planned.slug in done:
            rows.append(done[planned.slug])
            continue
        if not main and planned.settings is None:
            continue  # held-out control rows: rank 0 alone
        row, grid = score_row(pipe, planned, ref, progress, store, before_first_write, reference)
        if not main:
            continue
        before_first_write()
        store.write_row(row, report.image_grid_png(grid))
        rows.append(row)
    if main:
        store.finish(manifest, rows, report.write_all)


# ----------------------------------------------------------------------------- bench sample, bench datasets

def sample_to_file(cfg: Config, ds: DatasetConfig, name: str, steps: int | None, temperature: float,
                   top_k: int | None, top_p: float | None, num: int, seed: int, first_index: int, batch_size: int,
                   device: str, execution: str, out: Path, force: bool = False, progress: bool = True) -> str:
    """Samples `first_index .. first_index + num - 1` of sampler `name` to out (.npz: `tokens` (N, h, w)
    int64, `images` (N, H, W, C) uint8). Loads only the tokenizer and the prior the sampler needs."""
    from .checkpoints import check_writable
    from .samplers import generate
    check_writable(out, force)
    if num > MAX_SAMPLES:
        raise BenchError(f"--num {num} is more than one file holds ({MAX_SAMPLES:,}); draw them in parts with "
                         f"--first-index")
    cls = sampler_class(name)
    if steps is not None and not cls.takes_steps:
        raise BenchError(f"sampler {name!r} takes no --steps")
    if not cls.takes_temperature and (top_k, top_p) != (None, None):
        raise BenchError(f"sampler {name!r} draws no tokens from a network: --top-k and --top-p do not apply")
    settings = cls.settings(steps, temperature, top_k, top_p)
    dev = torch.device(device)
    execution = Execution.parse(execution)
    execution.check_device(dev)
    check_device(dev)
    tokenizer, priors = load_models(cfg, ds, dev, [cls.prior_kind] if cls.prior_kind else [])
    sampler = make_sampler(name, priors, tokenizer, execution)
    sampler.check(settings)
    tokens = generate(sampler, settings, seed, range(first_index, first_index + num), batch_size, dev, progress)
    images = np.concatenate([sampler.tokenizer.decode(tokens[i:i + batch_size])
                             for i in range(0, len(tokens), batch_size)])
    hw = sampler.tokenizer.latent_hw
    buf = io.BytesIO()
    np.savez(buf, tokens=tokens.reshape(-1, hw, hw), images=images, seed=seed,
             indices=np.arange(first_index, first_index + num), execution=sampler.execution(),
             tokenizer=sampler.tokenizer.name)
    atomic_write_bytes(out, buf.getvalue())
    return f"wrote {out}: tokens {tokens.reshape(-1, hw, hw).shape}, images {images.shape} ({settings.label()})"


def describe_dataset(cfg: Config, ds: DatasetConfig) -> list[str]:
    """Lines for `bench datasets`: the dataset, its splits and checkpoints, and whether each is present."""
    from .loading import reference_files
    from .paths import env_names
    lines = [f"{ds.name} ({ds.kind}, {ds.resolution}px, extractor {ds.extractor}, tokenizer {ds.tokenizer})"]
    lines += [f"  {split}: {text}" for split, text in ds.source.describe().items()]
    for key, written in [("tokenizer", ds.tokenizer)] + [(f"priors.{k}", v) for k, v in ds.priors.items()]:
        kind = key.removeprefix("priors.") if key.startswith("priors.") else None
        try:
            ref = cfg.checkpoint_ref(ds, written, key)
        except BenchError as e:
            lines.append(f"  {key}: not available: {e}")
            continue
        files = reference_files(ref, kind)
        missing = [f for f in files if not f.exists()]
        what = "official checkpoint" if ref.endswith(".th") else "checkpoint"
        if missing:
            names = env_names(written)
            via = f"${', $'.join(names)} or " if names else ""
            lines.append(f"  {key}: {what} {missing[0]} (missing); set {via}datasets.{ds.name}.{key} "
                         f"(= {written!r}) in {cfg.path}")
        else:
            lines.append(f"  {key}: {what} {files[0]} (present)")
    return lines
