"""One interface for every sampler, per-sample random streams, and the token draw they share.

A sampler turns a batch of per-sample noise streams into token grids. Sample i draws every random
number it uses from its own generator seeded by (seed, i), and always draws the same amount in the
same order, so its tokens depend only on (seed, i): never on batch size, device count or resume
point (up to float rounding of the network between batch sizes; see tests/test_sampling.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .errors import BenchError
from .execution import Execution


@dataclass(frozen=True)
class SamplerSettings:
    """One row of a sweep. steps=None where the sampler has no step count (autoregressive)."""
    sampler: str
    steps: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def label(self) -> str:
        parts = [self.sampler]
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        parts.append(f"t={self.temperature:g}")
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        if self.top_p:
            parts.append(f"top-p {self.top_p:g}")
        return ", ".join(parts)

    def slug(self) -> str:
        s = self.sampler
        if self.steps is not None:
            s += f"-s{self.steps}"
        s += f"-t{self.temperature:g}"
        if self.top_k:
            s += f"-k{self.top_k}"
        if self.top_p:
            s += f"-p{self.top_p:g}"
        return s

    def as_dict(self) -> dict:
        return asdict(self)


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


class SampleNoise:
    """Uniform [0, 1) draws from one generator per sample, stacked along the batch dimension."""

    def __init__(self, seed: int, indices: Iterable[int], device="cpu"):
        self.device = torch.device(device)
        self.indices = list(indices)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, int(i)))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g, device=self.device) for g in self.generators])


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k, and outside the smallest set whose probability reaches top_p,
    to -inf. The most likely token always survives."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class FiniteLogits:
    """NaN or +inf logits are an error, never a sample. On a CPU each call is checked at once; on a GPU
    the finding is kept on the device and checked by `check()` at the end of the batch, so that a
    sampling step never waits for the GPU just to look (the tokens drawn meanwhile are discarded)."""

    def __init__(self):
        self.bad: torch.Tensor | None = None

    def note(self, logits: torch.Tensor) -> None:
        bad = torch.isnan(logits).any() | torch.isposinf(logits).any()
        if logits.device.type == "cpu":
            self.bad = bad
            self.check()
        else:
            self.bad = bad if self.bad is None else self.bad | bad

    def check(self) -> None:
        if self.bad is not None and bool(self.bad):
            raise BenchError("the model produced NaN or +inf logits; refusing to draw samples from them")


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                top_k: int | None = None, top_p: float | None = None,
                finite: FiniteLogits | None = None) -> torch.Tensor:
    """Categorical draw by inverting the CDF with one uniform per position.

    logits (..., V), uniforms (...) in [0, 1). Temperature 0 means argmax (the uniforms are still
    consumed by the caller, so streams stay aligned across temperatures). `finite`: the sampler's
    FiniteLogits for this batch (checked when the batch is done); without one, checked now.
    """
    checker = finite or FiniteLogits()
    checker.note(logits)
    if finite is None:
        checker.check()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    cdf = logits.softmax(-1).cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    # right=True picks the first index whose cdf exceeds the target, so zero-probability tokens
    # (flat steps of the cdf) are never chosen
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1)


class Sampler:
    """Every sampler: `sample(noise, settings) -> tokens (B, L)` and the network evaluations it costs.

    Subclasses set `name`, the execution switches they can use (bench.execution) and `method`, and
    implement `sample` and `nfe`. `seq_len` is the number of tokens; `options` the switches in effect.
    """
    name = "sampler"
    takes_steps = True
    switches: tuple[str, ...] = ()
    method = ""

    def __init__(self, seq_len: int, codebook_size: int, execution: Execution | None = None):
        self.seq_len, self.codebook_size = seq_len, codebook_size
        self.options = (execution or Execution()).only(self.switches)
        self.passes_per_image: float | None = None  # network passes per image in the last sample() call

    def check(self, settings: SamplerSettings) -> None:
        if self.takes_steps:
            if settings.steps is None or not 1 <= settings.steps <= self.seq_len:
                raise BenchError(f"{self.name} needs steps in 1..{self.seq_len}, got {settings.steps}")
        if settings.temperature < 0:
            raise BenchError(f"temperature must be >= 0, got {settings.temperature}")

    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        raise NotImplementedError

    def nfe(self, settings: SamplerSettings) -> int:
        """Full-network forward evaluations per image."""
        raise NotImplementedError

    def execution(self) -> str:
        """How this sampler runs, recorded in every row it produces."""
        return f"{self.method}; execution {self.options.spec()} ({self.options.dtype})"


# name -> factory(priors: dict of loaded networks, device, execution) -> Sampler; baselines add theirs.
SAMPLERS: dict[str, Callable[..., Sampler]] = {}
# name -> the kind of prior it needs ("absorbing", "autoregressive") or None
SAMPLER_PRIORS: dict[str, str | None] = {}


def register_sampler(name: str, prior: str | None):
    def wrap(factory):
        SAMPLERS[name] = factory
        SAMPLER_PRIORS[name] = prior
        return factory
    return wrap


@torch.no_grad()
def generate(sampler: Sampler, settings: SamplerSettings, seed: int, indices: Iterable[int],
             batch_size: int, device="cpu", progress: bool = True) -> np.ndarray:
    """Tokens (N, L) int64 for the given sample indices, in that order."""
    sampler.check(settings)
    indices = list(indices)
    out = []
    bar = tqdm(total=len(indices), desc=f"sample {settings.label()}", unit="img",
               disable=not progress, leave=False)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        tokens = sampler.sample(SampleNoise(seed, chunk, device), settings)
        out.append(tokens.cpu().numpy().astype(np.int64))
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, sampler.seq_len), np.int64)


class RandomCodesSampler(Sampler):
    """The `random-codes` control: every token uniform over the codebook (a ceiling for FID)."""
    name = "random-codes"
    takes_steps = False
    method = "uniform random codes, no network"

    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        u = noise.rand(self.seq_len)
        return (u * self.codebook_size).long().clamp_(max=self.codebook_size - 1)

    def nfe(self, settings: SamplerSettings) -> int:
        return 0


@register_sampler("random-codes", prior=None)
def _random_codes(priors: dict, device="cpu", execution: Execution | None = None, seq_len: int = 0,
                  codebook_size: int = 0) -> Sampler:
    return RandomCodesSampler(seq_len, codebook_size)
