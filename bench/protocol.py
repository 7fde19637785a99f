"""One run of the protocol: reference features, control rows, sampler rows, timing, results.

    data -> tokenizer -> prior + sampler -> tokens -> decode -> uint8 images
         -> features -> metrics vs reference -> rows -> results
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import absorbing  # noqa: F401  (registers the absorbing sampler)
from . import distributed, results
from .checkpoints import atomic_write_bytes, checkpoint_sha256
from .config import Config, DatasetConfig, checkpoint_path, dataset_path
from .data import iterate_batches, open_images, to_float, to_uint8
from .errors import BenchError
from .features import Extractor, extract_features, load_extractor
from .metrics import cleanfid_cross_check, compute_metrics
from .models import Transformer, VQAutoEncoder, load_transformer, load_vq
from .execution import Execution
from .samplers import SAMPLER_PRIORS, SAMPLERS, SampleNoise, Sampler, SamplerSettings
from .timing import device_name, time_phases

CONTROL_ROWS = ("data", "reconstruction", "random-codes")
GRID_SIZE = 64


def _load_baselines() -> None:
    try:  # baselines register their samplers on import
        import baselines  # noqa: F401
    except ImportError:
        pass


@dataclass
class Pipeline:
    """Everything a dataset's rows need, loaded once."""
    cfg: Config
    ds: DatasetConfig
    device: torch.device
    vq: VQAutoEncoder
    priors: dict[str, Transformer]
    extractor: Extractor
    train: object
    heldout: object | None
    hashes: dict
    execution: Execution = Execution()  # speed switches; the plain fp32 path by default
    dist: distributed.Dist = distributed.SINGLE  # torchrun: this process's rank (bench.distributed)

    @property
    def seq_len(self) -> int:
        return self.vq.cfg.latent_hw ** 2

    def make_sampler(self, name: str) -> Sampler:
        _load_baselines()
        if name not in SAMPLERS:
            raise BenchError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}")
        if name == "random-codes":
            return SAMPLERS[name](self.priors, self.device, seq_len=self.seq_len,
                                  codebook_size=self.vq.cfg.codebook_size)
        return SAMPLERS[name](self.priors, self.device, self.execution)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        tokens = torch.as_tensor(tokens, device=self.device)
        hw = self.vq.cfg.latent_hw
        return to_uint8(self.vq.decode(tokens.reshape(len(tokens), hw, hw)))

    @torch.no_grad()
    def reconstruct(self, batch: np.ndarray) -> np.ndarray:
        return to_uint8(self.vq.decode(self.vq.encode(to_float(batch, self.device))))


def open_split(cfg: Config, ds: DatasetConfig, split: str):
    if ds.kind == "digits":
        return open_images("digits", split, ds.source)
    return open_images(ds.kind, split, {**ds.source, "path": str(dataset_path(cfg, ds, split))})


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")


def extractor_weights(cfg: Config, extractor: str) -> str | None:
    """The weights file bench.toml names for this extractor, if any (metrics.inception_weights)."""
    return cfg.metrics.get("inception_weights") if extractor == "inception-v3-compat" else None


def load_models(cfg: Config, ds: DatasetConfig, device: torch.device,
                kinds) -> tuple[VQAutoEncoder, dict[str, Transformer], dict]:
    """The dataset's tokenizer and its priors of `kinds`, checked against each other.
    -> (vq, priors, checkpoint hashes)."""
    for kind in ds.priors:
        if kind not in ("absorbing", "autoregressive"):
            raise BenchError(f"{cfg.path}: datasets.{ds.name}.priors.{kind}: expected 'absorbing' or 'autoregressive'")
    tokenizer = checkpoint_path(cfg, ds, ds.tokenizer, "tokenizer")
    vq, _ = load_vq(tokenizer, official_hparams=ds.official_hparams)
    hashes = {"tokenizer": checkpoint_sha256(tokenizer)}
    priors = {}
    for kind, stem in ds.priors.items():
        if kind not in kinds:
            continue
        stem = checkpoint_path(cfg, ds, stem, f"priors.{kind}")
        model, _ = load_transformer(stem, kind, official_hparams=ds.official_hparams)
        if model.cfg.codebook_size != vq.cfg.codebook_size or model.cfg.block_size != vq.cfg.latent_hw ** 2:
            raise BenchError(f"prior {stem} expects codebook {model.cfg.codebook_size} and {model.cfg.block_size} tokens; "
                             f"tokenizer {ds.tokenizer} has codebook {vq.cfg.codebook_size} and {vq.cfg.latent_hw ** 2} tokens")
        priors[kind] = model.to(device)
        hashes[kind] = checkpoint_sha256(stem)
    return vq.to(device), priors, hashes


def load_pipeline(cfg: Config, ds: DatasetConfig, device: str, samplers: list[str],
                  execution: Execution | None = None) -> Pipeline:
    """Load and check every input before anything is written."""
    device = torch.device(device)
    execution = execution or Execution.parse(cfg.run["execution"])
    execution.check_device(device)
    check_device(device)
    train = open_split(cfg, ds, "train")
    heldout = open_split(cfg, ds, "heldout") if ds.kind == "digits" or "heldout" in ds.splits else None
    if train.resolution != ds.resolution or train.channels != ds.channels:
        raise BenchError(f"dataset {ds.name}: images are {train.resolution}px x {train.channels} channels, "
                         f"config says {ds.resolution}px x {ds.channels}")
    _load_baselines()  # unknown samplers are refused below, by make_sampler
    # load only the priors the requested rows use
    vq, priors, hashes = load_models(cfg, ds, device, {SAMPLER_PRIORS.get(s) for s in samplers} - {None})
    if vq.cfg.img_size != ds.resolution or vq.cfg.n_channels != ds.channels:
        raise BenchError(f"tokenizer {ds.tokenizer} is for {vq.cfg.img_size}px x {vq.cfg.n_channels} channels, "
                         f"dataset {ds.name} is {ds.resolution}px x {ds.channels}")
    extractor = load_extractor(ds.extractor, str(device), weights_path=extractor_weights(cfg, ds.extractor))
    hashes["extractor"] = extractor.weights_sha256
    pipe = Pipeline(cfg, ds, device, vq, priors, extractor, train, heldout, hashes, execution)
    for name in samplers:  # fail now on an unknown sampler or a missing prior
        if name not in CONTROL_ROWS or name == "random-codes":
            pipe.make_sampler(name)
    return pipe


# ----------------------------------------------------------------------------- reference

def reference_key(pipe: Pipeline) -> str:
    parts = {"dataset": pipe.ds.name, "content": pipe.train.content_id(), "split": "train",
             "resolution": pipe.ds.resolution, "channels": pipe.ds.channels,
             "preprocessing": "resize+centercrop" if pipe.ds.kind != "digits" else "digits-bilinear",
             "extractor": pipe.extractor.name, "extractor_sha256": pipe.extractor.weights_sha256,
             "count": len(pipe.train)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def reference_features(pipe: Pipeline, progress: bool) -> tuple[np.ndarray, str]:
    """Features of the whole training split, cached under a key of everything that changes them."""
    key = reference_key(pipe)
    cache = Path(pipe.cfg.run["cache_dir"]).expanduser() / "reference" / f"{pipe.ds.name}-{key}.npy"
    if cache.is_file():
        feats = np.load(cache)
        if feats.shape[0] == len(pipe.train):
            return feats, key
    batch = pipe.ds.batch_size or pipe.cfg.run["batch_size"]
    feats = extract_features(pipe.extractor, iterate_batches(pipe.train, batch), total=len(pipe.train),
                             desc=f"reference features ({pipe.ds.name} train)", progress=progress)
    import io
    buf = io.BytesIO()
    np.save(buf, feats)
    atomic_write_bytes(cache, buf.getvalue())
    return feats, key


# ----------------------------------------------------------------------------- rows

def expand_sweep(ds: DatasetConfig, samplers: list[str] | None, steps: list[int] | None) -> list[SamplerSettings]:
    rows = []
    for entry in ds.sweep:
        if samplers is not None and entry.sampler not in samplers:
            continue
        entry_steps = (steps or entry.steps) if entry.steps is not None else [None]
        for t in entry.temperatures:
            for s in entry_steps:
                rows.append(SamplerSettings(entry.sampler, s, t, entry.top_k, entry.top_p))
    if samplers is not None:
        configured = {e.sampler for e in ds.sweep} | set(CONTROL_ROWS)
        unknown = [s for s in samplers if s not in configured]
        if unknown:
            raise BenchError(f"--samplers {','.join(unknown)}: not in the sweep of dataset {ds.name} "
                             f"(it has: {', '.join(sorted(configured))})")
    return rows


def _batch_size(pipe: Pipeline) -> int:
    return pipe.ds.batch_size or pipe.cfg.run["batch_size"]


def _sampled_features(pipe: Pipeline, sampler: Sampler, settings: SamplerSettings, n: int, grid: dict,
                      starts: list[int], shards: "results.ShardStore | None", label: str,
                      progress: bool) -> np.ndarray:
    """Features of the batches starting at `starts` (all of 0, B, 2B, ... < n, or this rank's share),
    each batch sampled, decoded and extracted, or read back from a shard an interrupted run finished.
    grid: sample index -> image, for the indices below GRID_SIZE."""
    batch = _batch_size(pipe)
    seed = pipe.cfg.run["seed"]
    out = []
    total = sum(min(batch, n - s) for s in starts)
    with tqdm(total=total, desc=label, unit="img", disable=not progress, leave=False) as bar:
        for start in starts:
            done = shards.load(start) if shards is not None else None
            if done is None:
                idx = range(start, min(start + batch, n))
                with torch.no_grad():
                    tokens = sampler.sample(SampleNoise(seed, idx, pipe.device), settings)
                images = pipe.decode(tokens)
                done = pipe.extractor(images), {i: img for i, img in zip(idx, images) if i < GRID_SIZE}
                if shards is not None:
                    shards.save(start, *done)
            out.append(done[0])
            grid.update(done[1])
            bar.update(len(done[0]))
    return np.concatenate(out) if out else np.zeros((0, pipe.extractor.dim))


def _control_batches(pipe: Pipeline, name: str, grid: dict) -> Iterator[np.ndarray]:
    seen = 0
    for images in iterate_batches(pipe.heldout, _batch_size(pipe)):
        if name == "reconstruction":
            images = pipe.reconstruct(images)
        grid.update((seen + j, img) for j, img in enumerate(images[:max(0, GRID_SIZE - seen)]))
        seen += len(images)
        yield images


def time_sampler(pipe: Pipeline, sampler: Sampler, settings: SamplerSettings) -> dict:
    t = pipe.cfg.timing
    b, seed = t["batch_size"], pipe.cfg.run["seed"]

    def sample():
        with torch.no_grad():
            return sampler.sample(SampleNoise(seed, range(b), pipe.device), settings)

    times = time_phases(sample, pipe.decode, pipe.extractor, b, t["warmup"], t["repeats"], pipe.device)
    return {**times, "passes_per_image": sampler.passes_per_image}


def score_row(pipe: Pipeline, name: str, settings: SamplerSettings | None, n: int, ref: np.ndarray,
              progress: bool, shards: "results.ShardStore | None" = None) -> tuple[dict, np.ndarray]:
    """-> (row, sample grid images). `name` is a control row or settings.sampler.
    Under torchrun a sampled row is sharded (bench.distributed): ranks other than 0 get (None, None)."""
    grid: dict = {}
    base = {"dataset": pipe.ds.name, "sampler": name, "steps": None, "temperature": None, "top_k": None,
            "top_p": None, "features": pipe.extractor.name, "device": device_name(pipe.device),
            "dtype": "float32", "switches": "plain", "seed": None}
    control = name in ("data", "reconstruction")
    if control:
        if pipe.heldout is None:
            raise BenchError(f"row {name!r} needs a held-out split: set datasets.{pipe.ds.name}.heldout")
        row = {**base, "slug": name, "label": name}
        feats = extract_features(pipe.extractor, _control_batches(pipe, name, grid), total=len(pipe.heldout),
                                 desc=name, progress=progress)
    else:
        sampler = pipe.make_sampler(name)
        sampler.check(settings)
        batch = _batch_size(pipe)
        starts = pipe.dist.my_batches(range(0, n, batch))  # all batches in a single process
        indices = np.array([i for s in starts for i in range(s, min(s + batch, n))], dtype=np.int64)
        row = {**base, **settings.as_dict(), "slug": settings.slug(), "label": settings.label(),
               "seed": pipe.cfg.run["seed"], "nfe": sampler.nfe(settings), "execution": sampler.execution(),
               "switches": sampler.options.spec(), "dtype": sampler.options.dtype}
        if name == "random-codes":
            row.update(slug="random-codes", label="random-codes", temperature=None)
        feats = _sampled_features(pipe, sampler, settings, n, grid, starts, shards, row["label"], progress)
        feats, grid = distributed.gather_in_order(pipe.dist, indices, feats, grid)  # as is in one process
        if feats is None:
            return None, None  # not rank 0: metrics, timing and writing are rank 0's
    # the reference is the training split, so memorisation is measured against what the models saw
    metrics = compute_metrics(feats, ref, {**pipe.cfg.metrics, **pipe.ds.metrics, "seed": pipe.cfg.run["seed"],
                                           "memorisation": True})
    if pipe.cfg.metrics.get("cleanfid_check"):
        metrics["fid_cleanfid"] = cleanfid_cross_check(feats, ref)["fid_cleanfid"]
    timing = {} if control else time_sampler(pipe, sampler, settings)
    row.update(n_samples=len(feats), **metrics, **timing)
    return row, np.stack([grid[i] for i in sorted(grid)])


# ----------------------------------------------------------------------------- the run

@dataclass
class RunRequest:
    dataset: str | None = None
    samplers: list[str] | None = None
    steps: list[int] | None = None
    num_samples: int | None = None
    device: str | None = None
    execution: str | None = None  # speed switches (bench.execution); None: run.execution of bench.toml
    run_name: str | None = None
    resume: bool = False
    force: bool = False
    progress: bool = True


def plan_rows(ds: DatasetConfig, req: RunRequest) -> list[tuple[str, SamplerSettings | None]]:
    controls = [c for c in CONTROL_ROWS if req.samplers is None or c in req.samplers]
    plan = [(c, SamplerSettings("random-codes", None, 1.0) if c == "random-codes" else None) for c in controls]
    return plan + [(s.sampler, s) for s in expand_sweep(ds, req.samplers, req.steps)]


def run(cfg: Config, req: RunRequest) -> Path:
    ds = cfg.dataset(req.dataset)
    n = req.num_samples or ds.num_samples
    if n < 1:
        raise BenchError(f"--num-samples must be positive, got {n}")
    device = req.device or cfg.run["device"]
    plan = plan_rows(ds, req)
    if not plan:
        raise BenchError("nothing to run: the sweep and --samplers select no rows")
    # torchrun: join the process group; every rank checks the same input, rank 0 alone writes
    dist = distributed.init(device)
    device, main = dist.device(device), dist.is_main
    execution = Execution.parse(req.execution or cfg.run["execution"])
    pipe = load_pipeline(cfg, ds, device, [name for name, _ in plan], execution)
    pipe.dist = dist
    manifest = results.build_manifest(cfg, ds, req, pipe, n, plan)
    if dist.sharded:
        manifest["distributed"] = {"world_size": dist.world_size, "sharding": "whole batches, round-robin"}
    run_dir = results.check_run_dir(cfg, ds, req, manifest)
    done = results.finished_rows(run_dir) if req.resume and run_dir.exists() else {}
    if req.force and dist.sharded and main and run_dir.exists():
        shutil.rmtree(run_dir)  # now, before any rank writes shards into it
    distributed.barrier(dist)  # every rank has checked the run directory before rank 0 creates it
    progress = req.progress and main
    ref, ref_key = reference_features(pipe, progress) if main else (None, None)
    if main:
        manifest["reference"] = {"key": ref_key, "count": int(len(ref)), "split": "train"}
    created = bool(done) or (req.resume and run_dir.exists())

    def before_first_write():
        nonlocal created
        if main and not created:  # sharded: the old run was removed above, other ranks may be writing
            results.create_run_dir(run_dir, manifest, req.force and not dist.sharded)
            created = True

    rows = []
    for name, settings in tqdm(plan, desc=f"rows ({ds.name})", unit="row", disable=not progress):
        slug = settings.slug() if settings is not None and name != "random-codes" else name
        if slug in done:
            rows.append(done[slug])
            continue
        if not main and name in ("data", "reconstruction"):
            continue  # held-out control rows: rank 0 alone
        shards = results.ShardStore(run_dir / "rows" / f"{slug}.shards", _batch_size(pipe), before_first_write)
        row, grid = score_row(pipe, name, settings, n, ref, progress, shards)
        if not main:
            continue
        before_first_write()
        results.save_grid(run_dir, slug, grid)
        results.write_row(run_dir, row)
        shards.remove()
        rows.append(row)
    if main:
        results.finish(run_dir, manifest, rows)
    distributed.finish(dist)
    return run_dir
