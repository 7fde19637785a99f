"""`bench perf`: the timing protocol alone, on a configured dataset's models or at a named shape with
random weights (the paper's churches shape: 24 layers, width 512, 8 heads, 256 tokens, codebook 1024).

Every row says how it ran (sampler execution, dtype, batch) and reports sampling and decoding apart,
img/s, tokens/s, NFE, analytic FLOPs per image, MFU against a matmul peak measured on the same
device, and peak memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import BenchError
from .models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig
from .samplers import SAMPLER_PRIORS, SAMPLERS, SampleNoise, Sampler, SamplerSettings
from .timing import device_name, median_seconds, peak_memory_mb, reset_peak_memory

SHAPES = {
    # (transformer, VQ) at the size of the official churches/bedrooms/ffhq models
    "churches": (dict(codebook_size=1024, block_size=256, n_layers=24, n_head=8, n_emb=512),
                 dict(img_size=256, n_channels=3, nf=128, ch_mult=[1, 1, 2, 2, 4], res_blocks=2,
                      attn_resolutions=[16], codebook_size=1024, emb_dim=256)),
}


def forward_flops(cfg: TransformerConfig, new_tokens: int, context: int) -> float:
    """Matmul FLOPs of one forward pass over `new_tokens` positions attending to `context` keys."""
    d = cfg.n_emb
    per_token = cfg.n_layers * (2 * 4 * d * d + 2 * 8 * d * d + 2 * 2 * context * d) + 2 * d * cfg.codebook_size
    return float(new_tokens * per_token)


def flops_per_image(sampler: Sampler, settings: SamplerSettings, cfg: TransformerConfig) -> float | None:
    L = cfg.block_size
    name = sampler.name
    if name in ("absorbing", "maskgit"):
        return settings.steps * forward_flops(cfg, L, L)
    if name == "autoregressive":      # one new token per step, attending to the cache
        return sum(forward_flops(cfg, 1, i + 1) for i in range(L))
    if name == "autoregressive-recompute":  # the whole prefix (and start token) every step
        return sum(forward_flops(cfg, i + 1, i + 1) for i in range(L))
    return None


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured FLOP/s of a square matmul: the best of a few timed repeats."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_seconds(lambda: a @ b, warmup=2, repeats=5, device=device)
    return 2 * n ** 3 / t


@dataclass
class PerfModels:
    priors: dict[str, Transformer]
    vq: VQAutoEncoder
    source: str


def random_models(shape: str, device, dtype, seed: int = 0) -> PerfModels:
    if shape not in SHAPES:
        raise BenchError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    tcfg, vcfg = SHAPES[shape]
    torch.manual_seed(seed)
    priors = {"absorbing": Transformer(TransformerConfig(**tcfg)),
              "autoregressive": Transformer(TransformerConfig(**tcfg, causal=True))}
    vq = VQAutoEncoder(VQConfig(**vcfg))
    return PerfModels({k: m.to(device, dtype).eval() for k, m in priors.items()}, vq.to(device, dtype).eval(),
                      f"{shape} shape, random weights (seed {seed})")


def dataset_models(cfg, ds, device, dtype) -> PerfModels:
    """The configured tokenizer and priors of a dataset (no data needed)."""
    from .config import checkpoint_path
    from .models import load_transformer, load_vq
    vq, _ = load_vq(checkpoint_path(cfg, ds, ds.tokenizer, "tokenizer"), official_hparams=ds.official_hparams)
    priors = {kind: load_transformer(checkpoint_path(cfg, ds, stem, f"priors.{kind}"), kind,
                                     official_hparams=ds.official_hparams)[0].to(device, dtype).eval()
              for kind, stem in ds.priors.items()}
    return PerfModels(priors, vq.to(device, dtype).eval(), f"dataset {ds.name}: {ds.tokenizer}, {ds.priors}")


def time_row(models: PerfModels, sampler_name: str, settings: SamplerSettings, batch: int, warmup: int,
             repeats: int, device, dtype: torch.dtype, peak: float) -> dict:
    sampler = SAMPLERS[sampler_name](models.priors, device)
    sampler.check(settings)
    cfg = next(iter(models.priors.values())).cfg
    hw = int(cfg.block_size ** 0.5)
    box = {}

    def sample():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            box["tokens"] = sampler.sample(SampleNoise(0, range(batch), device), settings)

    def decode():
        with torch.no_grad():
            models.vq.decode(box["tokens"].reshape(batch, hw, hw))

    reset_peak_memory(device)
    s = median_seconds(sample, warmup, repeats, device)
    d = median_seconds(decode, warmup, repeats, device)
    flops = flops_per_image(sampler, settings, cfg)
    return {"sampler": sampler_name, "steps": settings.steps, "temperature": settings.temperature,
            "batch_size": batch, "img_per_s": batch / (s + d), "sampling_img_per_s": batch / s,
            "tokens_per_s": batch * cfg.block_size / s, "sample_s_per_batch": s, "decode_s_per_batch": d,
            "nfe": sampler.nfe(settings), "flops_per_image": flops,
            "mfu": (flops * batch / s) / peak if flops else None, "peak_mem_mb": peak_memory_mb(device),
            "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "execution": sampler.execution(), "label": settings.label()}


def run_perf(models: PerfModels, plan: list[SamplerSettings], batch: int, warmup: int, repeats: int,
             device, dtype: torch.dtype, progress: bool = True) -> dict:
    from tqdm import tqdm
    device = torch.device(device)
    peak = matmul_peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = []
    for settings in tqdm(plan, desc="perf", disable=not progress):
        needed = SAMPLER_PRIORS.get(settings.sampler)
        if needed is not None and needed not in models.priors:
            raise BenchError(f"sampler {settings.sampler!r} needs a {needed} prior, which this model set lacks")
        rows.append(time_row(models, settings.sampler, settings, batch, warmup, repeats, device, dtype, peak))
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": models.source, "device": device_name(device),
            "matmul_peak_tflops": peak / 1e12,
            "peak_basis": "measured bf16 matmul" if device.type == "cuda" else "measured fp32 matmul (CPU)",
            "warmup": warmup, "repeats": repeats, "rows": rows}
