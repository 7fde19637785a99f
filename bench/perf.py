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

from . import absorbing  # noqa: F401  (registers the absorbing sampler)
from .data import to_uint8
from .errors import BenchError
from .execution import Execution
from .models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig
from .samplers import SAMPLER_PRIORS, SAMPLERS, SampleNoise, Sampler, SamplerSettings
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


def forward_flops(cfg: TransformerConfig, new_tokens: int, context: int) -> float:
    """Matmul FLOPs of one forward pass over `new_tokens` positions attending to `context` keys."""
    d = cfg.n_emb
    per_token = cfg.n_layers * (2 * 4 * d * d + 2 * 8 * d * d + 2 * 2 * context * d) + 2 * d * cfg.codebook_size
    return float(new_tokens * per_token)


def flops_per_image(sampler: Sampler, settings: SamplerSettings, cfg: TransformerConfig) -> float | None:
    """FLOPs of the passes the last sample() call ran (skip-idle runs fewer than the steps)."""
    L = cfg.block_size
    name = sampler.name
    if name in ("absorbing", "maskgit"):
        passes = sampler.passes_per_image if sampler.passes_per_image is not None else settings.steps
        return passes * forward_flops(cfg, L, L)
    if name == "autoregressive":      # one new token per step, attending to the cache
        return sum(forward_flops(cfg, 1, i + 1) for i in range(L))
    if name == "autoregressive-recompute":  # the whole prefix (and start token) every step
        return sum(forward_flops(cfg, i + 1, i + 1) for i in range(L))
    return None


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
    priors: dict[str, Transformer]
    vq: VQAutoEncoder
    source: str
    extractor: object | None = None    # bench.features.Extractor, or None: features not timed
    extractor_note: str = ""


def random_models(shape: str, device) -> PerfModels:
    if shape not in SHAPES:
        raise BenchError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    tcfg, vcfg = SHAPES[shape]
    torch.manual_seed(0)
    priors = {"absorbing": Transformer(TransformerConfig(**tcfg)),
              "autoregressive": Transformer(TransformerConfig(**tcfg, causal=True))}
    vq = VQAutoEncoder(VQConfig(**vcfg))
    return PerfModels({k: m.to(device).eval() for k, m in priors.items()}, vq.to(device).eval(),
                      f"{shape} shape, random weights (seed 0)")


def dataset_models(cfg, ds, device) -> PerfModels:
    """The configured tokenizer and priors of a dataset (no data needed)."""
    from .protocol import load_models
    vq, priors, _ = load_models(cfg, ds, device, set(ds.priors))
    return PerfModels(priors, vq, f"dataset {ds.name}: {ds.tokenizer}, {ds.priors}")


def attach_extractor(models: PerfModels, name: str, device, weights_path: str | None = None) -> None:
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


def time_row(models: PerfModels, row: PerfRow, warmup: int, repeats: int, device, peaks: dict[str, float]) -> dict:
    settings, batch = row.settings, row.batch
    sampler = SAMPLERS[settings.sampler](models.priors, device, row.execution)
    sampler.check(settings)
    cfg = next(iter(models.priors.values())).cfg
    hw = int(cfg.block_size ** 0.5)

    def sample():
        with torch.no_grad():
            return sampler.sample(SampleNoise(0, range(batch), device), settings)

    def decode(tokens):
        with torch.no_grad():  # as `bench run`: uint8 images on the host, the extractor's input
            return to_uint8(models.vq.decode(tokens.reshape(batch, hw, hw)))

    t = time_phases(sample, decode, models.extractor, batch, warmup, repeats, device)
    s = t["sample_s_per_batch"]
    flops = flops_per_image(sampler, settings, cfg)
    return {"sampler": settings.sampler, "steps": settings.steps, "temperature": settings.temperature,
            "switches": sampler.options.spec(), "dtype": sampler.options.dtype, **t,
            "tokens_per_s": batch * cfg.block_size / s,
            "nfe": sampler.nfe(settings), "passes_per_image": sampler.passes_per_image,
            "flops_per_image": flops,
            "mfu": (flops * batch / s) / peak_for(peaks, device, sampler.options.dtype) if flops else None,
            "device": device_name(device), "execution": sampler.execution(), "label": settings.label()}


def plan_rows(models: PerfModels, samplers: list[str], steps: list[int], executions: list[Execution],
              batches: list[int], device) -> list[PerfRow]:
    """Every sampler (at every step count where it takes steps) x execution x batch size."""
    rows = []
    for name in samplers:
        if name not in SAMPLERS:
            raise BenchError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}")
        needed = SAMPLER_PRIORS.get(name)
        if needed is not None and needed not in models.priors:
            raise BenchError(f"sampler {name!r} needs a {needed} prior, which this model set lacks")
        sampler = SAMPLERS[name](models.priors, device)
        settings = [SamplerSettings(name, s, 1.0) for s in steps] if sampler.takes_steps else [SamplerSettings(name, None, 1.0)]
        # a switch the sampler has no use for is dropped, so two executions may be the same for it
        effective = list(dict.fromkeys(e.only(sampler.switches) for e in executions))
        rows += [PerfRow(s, e, b) for s in settings for e in effective for b in batches]
    return rows


def run_perf(models: PerfModels, rows: list[PerfRow], warmup: int, repeats: int, device,
             progress: bool = True) -> dict:
    from tqdm import tqdm
    device = torch.device(device)
    for row in rows:
        row.execution.check_device(device)
    peaks = matmul_peaks(device)
    out = [time_row(models, row, warmup, repeats, device, peaks)
           for row in tqdm(rows, desc="perf", disable=not progress)]
    return perf_result(models, device, peaks, out, warmup=warmup, repeats=repeats)


def perf_result(models: PerfModels, device: torch.device, peaks: dict[str, float], rows: list[dict], **extra) -> dict:
    """What results.json of a perf run holds: how it was measured, then the rows, with their speed-ups
    over the plain rows among them (rows with an `error` have none)."""
    add_speedups([r for r in rows if "error" not in r])
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": models.source, "device": device_name(device),
            "matmul_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
            "peak_basis": ("MFU against the measured bf16 matmul peak" if device.type == "cuda"
                           else "MFU against the measured matmul peak of each row's dtype"),
            "features": models.extractor_note or "features not timed", "torch": torch.__version__, **extra,
            "rows": rows}


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_plain: sampling img/s over the plain row of the same settings measured in the same
    run, at the same batch size where there is one, else at the plain row's (named in plain_batch)."""
    plain: dict = {}
    for r in rows:
        if r.get("switches") == "plain":
            plain.setdefault(r["label"], {})[r["batch_size"]] = r["sampling_img_per_s"]
    for r in rows:
        by_batch = plain.get(r["label"], {})
        batch = r["batch_size"] if r["batch_size"] in by_batch else next(iter(by_batch), None)
        r["speedup_vs_plain"] = r["sampling_img_per_s"] / by_batch[batch] if batch is not None else None
        r["plain_batch"] = batch


PERF_COLUMNS = ("label", "sampling_img_per_s", "end_to_end_img_per_s", "end_to_end_overhead", "features_s_per_batch",
                "tokens_per_s", "passes_per_image", "flops_per_image", "mfu", "speedup_vs_plain", "plain_batch",
                "estimate_hours", "execution", "error")
TABLE_HEADER = ["row", "execution", "batch", "sample s/batch", "decode s/batch", "features s/batch",
                "sampling img/s", "end-to-end img/s", "e2e overhead", "speed-up", "passes/img", "GFLOP/img",
                "MFU", "peak MB"]


def table_body(rows: list[dict]) -> list[list]:
    keys = ("switches", "batch_size", "sample_s_per_batch", "decode_s_per_batch", "features_s_per_batch",
            "sampling_img_per_s", "end_to_end_img_per_s", "end_to_end_overhead", "speedup_vs_plain",
            "passes_per_image", "flops_per_image", "mfu", "peak_mem_mb")
    body = []
    for r in rows:
        line = [r["label"]] + [r.get(k) for k in keys]
        line[keys.index("flops_per_image") + 1] = (r.get("flops_per_image") or 0) / 1e9
        body.append(line)
    return body


def write_perf(result: dict, out, estimate_samples: int | None = None) -> str:
    """results.json, results.csv and results.md under `out`; -> the Markdown text. A row with an
    `error` (scripts/perf_gpu.py) keeps its place in the table with the error as its note."""
    import json
    from pathlib import Path
    from .checkpoints import atomic_write_text
    from .report import render_markdown
    from .results import to_csv
    out = Path(out)
    rows = result["rows"]
    header, body = list(TABLE_HEADER), table_body(rows)
    if estimate_samples:
        header.append(f"hours per {estimate_samples}")
        for line, r in zip(body, rows):
            rate = r.get("end_to_end_img_per_s") or r.get("img_per_s")  # with features where they were timed
            if rate:
                r.update(estimate_samples=estimate_samples, estimate_hours=estimate_samples / rate / 3600)
            line.append(r.get("estimate_hours"))
    if any("error" in r for r in rows):
        header.append("note")
        for line, r in zip(body, rows):
            line.append(r.get("error", ""))
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "results.csv", to_csv(rows, PERF_COLUMNS))
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in result["matmul_peak_tflops"].items())
    text = (f"# perf: {result['source']}\n\ndevice: {result['device']}; torch {result['torch']}; matmul peak TFLOP/s: "
            f"{peaks} ({result['peak_basis']}); {result['features']}; "
            f"warm-up {result['warmup']}, median of {result['repeats']}\n\n" + render_markdown(header, body, 3))
    atomic_write_text(out / "results.md", text)
    return text
