"""`bench perf`: the timing protocol alone, on a configured dataset's models or at a named shape with
random weights (the paper's churches shape: 24 layers, width 512, 8 heads, 256 tokens, codebook 1024).

Every row says how it ran (sampler, execution switches, dtype, batch) and reports sampling, decoding
and feature extraction apart: img/s of sampling alone and end to end, tokens/s, NFE, the network
passes per image actually run, analytic FLOPs, MFU against a matrix-multiply peak measured on the same
device (bf16 on CUDA), peak memory, and the speed-up over the plain row of the same settings and
batch measured in the same run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .checkpoints import check_folder
from .errors import BenchError
from .execution import Execution
from .loading import PRIOR_KINDS, Prior, Tokenizer, VQTokenizer
from .models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig
from .results import Row
from .samplers import SampleNoise, SamplerSettings
from .samplers.registry import make_sampler, sampler_class
from .timing import device_name, median_seconds, time_phases

SHAPES = {
    # (transformer, VQ) at the size of the official churches/bedrooms/ffhq models
    "churches": (dict(codebook_size=1024, block_size=256, n_layers=24, n_head=8, n_emb=512),
                 dict(img_size=256, n_channels=3, nf=128, ch_mult=[1, 1, 2, 2, 4], res_blocks=2,
                      attn_resolutions=[16], codebook_size=1024, emb_dim=256)),
    # a few layers at 32x32: smoke runs of the GPU script and of `bench perf` on a CPU
    "tiny": (dict(codebook_size=64, block_size=64, n_layers=2, n_head=4, n_emb=64),
             dict(img_size=32, n_channels=3, nf=32, ch_mult=[1, 1, 2], res_blocks=1,
                  attn_resolutions=[8], codebook_size=64, emb_dim=32)),
}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured FLOP/s of a square matmul: the best of five timed repeats after three warm-ups."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = lambda: median_seconds(lambda: a @ b, warmup=0, repeats=1, device=device)  # noqa: E731
    for _ in range(3):
        timer()
    return 2 * n ** 3 / min(timer() for _ in range(5))


def matmul_peaks(device: torch.device) -> dict[str, float]:
    """FLOP/s peaks that MFU is measured against. On CUDA every row is judged against the bf16 peak
    (the issue's definition: what the tensor cores can do); on a CPU against the peak of the row's dtype."""
    return {"float32": matmul_peak_flops(device, torch.float32), "bfloat16": matmul_peak_flops(device, torch.bfloat16)}


def peak_for(peaks: dict[str, float], device: torch.device, dtype: str) -> float:
    return peaks["bfloat16"] if device.type == "cuda" else peaks[dtype]


@dataclass
class PerfModels:
    priors: dict[str, Prior]
    tokenizer: Tokenizer
    source: str
    extractor: object | None = None    # bench.features.Extractor, or None: features not timed
    extractor_note: str = ""


def random_models(shape: str, device) -> PerfModels:
    if shape not in SHAPES:
        raise BenchError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    tcfg, vcfg = SHAPES[shape]
    torch.manual_seed(0)
    nets = {name: Transformer(TransformerConfig(**tcfg, causal=kind.causal)) for name, kind in PRIOR_KINDS.items()
            if not kind.brings_tokenizer}  # the harness's own priors
    source = f"{shape} shape, random weights (seed 0)"
    priors = {k: Prior(k, m.eval(), source, "random", m.cfg.codebook_size, m.cfg.block_size).to(device)
              for k, m in nets.items()}
    tokenizer = VQTokenizer(VQAutoEncoder(VQConfig(**vcfg)), f"{shape} VQ, random weights", "random").to(device)
    return PerfModels(priors, tokenizer, source)


def dataset_models(cfg, ds, device) -> PerfModels:
    """The configured tokenizer and priors of a dataset (no data needed)."""
    from .protocol import load_models
    tokenizer, priors = load_models(cfg, ds, device, list(ds.priors))
    return PerfModels(priors, tokenizer, f"dataset {ds.name}: {ds.tokenizer}, {ds.priors}")


def attach_extractor(models: PerfModels, name: str, device, weights_path=None) -> None:
    """Time feature extraction with this extractor, or say in the result why features were not timed."""
    from .features import load_extractor
    try:
        models.extractor = load_extractor(name, str(device), weights_path=weights_path)
        models.extractor_note = f"features: {name}"
    except BenchError as e:
        models.extractor, models.extractor_note = None, f"features not timed ({name}: {e})"


@dataclass(frozen=True)
class PerfRow:
    settings: SamplerSettings
    execution: Execution
    batch: int


def time_row(models: PerfModels, row: PerfRow, warmup: int, repeats: int, device, peaks: dict[str, float]) -> Row:
    settings, batch = row.settings, row.batch
    sampler = make_sampler(settings.sampler, models.priors, models.tokenizer, row.execution)
    sampler.check(settings)

    def sample():
        with torch.no_grad():
            return sampler.sample(SampleNoise(0, range(batch), device), settings)

    t = time_phases(sample, sampler.tokenizer.decode, models.extractor, batch, warmup, repeats, device)
    s = t["sample_s_per_batch"]
    flops = sampler.flops_per_image(settings)
    return Row(**settings.as_dict(), switches=sampler.options.spec(), dtype=sampler.options.dtype, **t,
               tokens_per_s=batch * sampler.seq_len / s, nfe=sampler.nfe(settings),
               passes_per_image=sampler.passes_per_image, flops_per_image=flops,
               mfu=(flops * batch / s) / peak_for(peaks, device, sampler.options.dtype) if flops else None,
               device=device_name(device), execution=sampler.execution(), label=settings.label())


def plan_rows(models: PerfModels, samplers: list[str], steps: list[int], executions: list[Execution],
              batches: list[int]) -> list[PerfRow]:
    """Every sampler (at every step count where it takes steps) x execution x batch size. samplers None:
    every sampler whose prior the models have, except controls and recompute variants."""
    from .samplers.registry import SAMPLERS
    if samplers is None:
        samplers = [n for n, c in SAMPLERS.items() if c.timed_by_default and c.prior_kind in models.priors]
    rows = []
    for name in samplers:
        cls = sampler_class(name)
        if cls.prior_kind is not None and cls.prior_kind not in models.priors:
            raise BenchError(f"sampler {name!r} needs a {cls.prior_kind} prior, which this model set lacks")
        settings = [cls.settings(s, 1.0) for s in steps] if cls.takes_steps else [cls.settings(None, 1.0)]
        # a switch the sampler has no use for is dropped, so two executions may be the same for it
        effective = list(dict.fromkeys(e.only(cls.switches) for e in executions))
        rows += [PerfRow(s, e, b) for s in settings for e in effective for b in batches]
    return rows


def run_perf(models: PerfModels, rows: list[PerfRow], warmup: int, repeats: int, device,
             progress: bool = True) -> dict:
    from tqdm import tqdm
    device = torch.device(device)
    for row in rows:  # every row's settings before any is timed
        row.execution.check_device(device)
        make_sampler(row.settings.sampler, models.priors, models.tokenizer, row.execution).check(row.settings)
    peaks = matmul_peaks(device)
    out = [time_row(models, row, warmup, repeats, device, peaks)
           for row in tqdm(rows, desc="perf", disable=not progress)]
    return perf_result(models, device, peaks, out, warmup=warmup, repeats=repeats)


def perf_result(models: PerfModels, device: torch.device, peaks: dict[str, float], rows: list[Row], **extra) -> dict:
    """What results.json of a perf run holds: how it was measured, then the rows, with their speed-ups
    over the plain rows among them (rows with an `error` have none)."""
    add_speedups([r for r in rows if r.error is None])
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": models.source, "device": device_name(device),
            "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
            "peak_basis": ("MFU against the measured bf16 matmul peak" if device.type == "cuda"
                           else "MFU against the measured matmul peak of each row's dtype"),
            "features": models.extractor_note or "features not timed", "torch": torch.__version__, **extra,
            "rows": rows}


def add_speedups(rows: list[Row]) -> None:
    """speedup_vs_plain: sampling img/s over the plain row of the same settings measured in the same
    run, at the same batch size where there is one, else at the plain row's (named in plain_batch)."""
    plain: dict = {}
    for r in rows:
        if r.switches == "plain":
            plain.setdefault(r.label, {})[r.batch_size] = r.sampling_img_per_s
    for r in rows:
        by_batch = plain.get(r.label, {})
        batch = r.batch_size if r.batch_size in by_batch else next(iter(by_batch), None)
        r.speedup_vs_plain = r.sampling_img_per_s / by_batch[batch] if batch is not None else None
        r.plain_batch = batch


PERF_COLUMNS = ("label", "sampling_img_per_s", "end_to_end_img_per_s", "end_to_end_overhead", "features_s_per_batch",
                "tokens_per_s", "passes_per_image", "flops_per_image", "mfu", "speedup_vs_plain", "plain_batch",
                "estimate_hours", "execution", "error")
TABLE_HEADER = ["row", "execution", "batch", "sample s/batch", "decode s/batch", "features s/batch",
                "sampling img/s", "end-to-end img/s", "e2e overhead", "speed-up", "passes/img", "GFLOP/img",
                "MFU", "peak MB"]


def table_body(rows: list[Row]) -> list[list]:
    keys = ("switches", "batch_size", "sample_s_per_batch", "decode_s_per_batch", "features_s_per_batch",
            "sampling_img_per_s", "end_to_end_img_per_s", "end_to_end_overhead", "speedup_vs_plain",
            "passes_per_image", "flops_per_image", "mfu", "peak_mem_mb")
    body = []
    for r in rows:
        line = [r.label] + [getattr(r, k) for k in keys]
        line[keys.index("flops_per_image") + 1] = (r.flops_per_image or 0) / 1e9
        body.append(line)
    return body


def write_perf(result: dict, out, estimate_samples: int | None = None) -> str:
    """results.json, results.csv and results.md under `out`; -> the Markdown text. A row with an
    `error` (scripts/perf_gpu.py) keeps its place in the table with the error as its note."""
    from pathlib import Path
    from .checkpoints import atomic_write_text
    from .report import render_markdown
    from .results import SCHEMA, to_csv, to_json
    out = Path(out)
    rows = result["rows"]
    header, body = list(TABLE_HEADER), table_body(rows)
    if estimate_samples:
        header.append(f"hours per {estimate_samples}")
        for line, r in zip(body, rows):
            rate = r.end_to_end_img_per_s or r.img_per_s  # with features where they were timed
            if rate:
                r.estimate_samples, r.estimate_hours = estimate_samples, estimate_samples / rate / 3600
            line.append(r.estimate_hours)
    if any(r.error is not None for r in rows):
        header.append("note")
        for line, r in zip(body, rows):
            line.append(r.error or "")
    atomic_write_text(out / "results.json", to_json(result))
    atomic_write_text(out / "results.csv", to_csv(rows, SCHEMA + [c for c in PERF_COLUMNS if c not in SCHEMA]))
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in result["matmul_peak_tflops"].items())
    text = (f"# perf: {result['source']}\n\ndevice: {result['device']}; torch {result['torch']}; matmul peak TFLOP/s: "
            f"{peaks} ({result['peak_basis']}); {result['features']}; "
            f"warm-up {result['warmup']}, median of {result['repeats']}\n\n" + render_markdown(header, body, 3))
    atomic_write_text(out / "results.md", text)
    return text


def run_perf_command(cfg, dataset, shape, samplers, steps, executions, batch_sizes, device, features, warmup,
                     repeats, out, estimate_samples, force: bool = False, progress: bool = True):
    """`bench perf`: the models (a dataset's or a named shape's), the rows, the timing, the files.
    -> (Markdown table, output folder)."""
    from pathlib import Path
    from .execution import check_device
    device = torch.device(device or cfg.run.device)
    check_device(device)
    out = Path(out) if out else cfg.results_dir() / "perf" / time.strftime("%Y%m%d-%H%M%S")
    check_folder(out, f"--out {out}")
    if (out / "results.json").exists() and not force:
        raise BenchError(f"{out} already holds perf results; pass --force to overwrite them or choose another --out")
    models = random_models(shape, device) if shape else dataset_models(cfg, cfg.dataset(dataset), device)
    if features:
        name = "inception-v3-compat" if shape else cfg.dataset(dataset).extractor
        attach_extractor(models, name, device, cfg.extractor_weights(name))
    rows = plan_rows(models, samplers, steps or ([50, 256] if shape else [1, 4, 16, 64]),
                     [Execution.parse(e) for e in executions], batch_sizes or [cfg.timing.batch_size])
    result = run_perf(models, rows, cfg.timing.warmup if warmup is None else warmup,
                      repeats or cfg.timing.repeats, device, progress)
    return write_perf(result, out, estimate_samples), out
