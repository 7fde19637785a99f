"""One interface for every sampler: the settings of a row and the Sampler class.

A sampler turns a batch of per-sample noise streams (bench.samplers.noise) into token grids with
the shared token draw (bench.samplers.draw). Its class says everything the protocol needs to know,
so the protocol never branches on a sampler's name:

    name          the registry name (bench.samplers.registry), e.g. "absorbing"
    prior_kind    the entry of a dataset's `priors` table it needs, or None (random-codes)
    takes_steps   whether rows of it have a step count
    takes_temperature  False where temperature, top-k and top-p mean nothing (random-codes)
    control       a control row rather than a sampler under test (random-codes)
    timed_by_default   whether `bench perf` times it when no samplers are named
    switches      the execution switches it can use (bench.execution)
    method        one line on how it samples, recorded in every row
    nfe(), flops_per_image()   its network evaluations and analytic FLOPs per image

`tokenizer` is the first stage whose codes it emits: the dataset's, or the one its prior brings
(bench.loading.Prior.tokenizer); the protocol decodes each row with its sampler's tokenizer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from ..errors import BenchError
from ..execution import Execution
from .noise import SampleNoise


@dataclass(frozen=True)
class SamplerSettings:
    """One row of a sweep. steps=None where the sampler has no step count (autoregressive);
    temperature=None where it draws no tokens from a network (random-codes). Every value is checked
    here, where settings are made: a NaN temperature or a negative top-k never reaches a sampler."""
    sampler: str
    steps: int | None = None
    temperature: float | None = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        def bad(what: str, value, expected: str):
            return BenchError(f"{self.sampler}: {what} = {value!r}; expected {expected}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise bad("steps", self.steps, "a positive integer")
        if self.temperature is not None:
            if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                    or not math.isfinite(self.temperature) or self.temperature < 0:
                raise bad("temperature", self.temperature, "a finite number >= 0 (0 means argmax)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise bad("top_k", self.top_k, "a positive integer")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "a number in (0, 1]")

    def label(self) -> str:
        parts = [self.sampler]
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.temperature is not None:
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
        if self.temperature is not None:
            s += f"-t{self.temperature:g}"
        if self.top_k:
            s += f"-k{self.top_k}"
        if self.top_p:
            s += f"-p{self.top_p:g}"
        return s

    def as_dict(self) -> dict:
        return asdict(self)


class Sampler:
    """Every sampler: `sample(noise, settings) -> tokens (B, L)` and what it costs.

    network: the prior's network (None for random-codes); tokenizer: the first stage whose codes it
    emits (bench.loading.Tokenizer; tests may leave it out, then the network's config gives the
    sequence length and codebook). `options` are the execution switches in effect.
    """
    name = "sampler"
    prior_kind: str | None = None
    takes_steps = True
    takes_temperature = True
    control = False
    timed_by_default = True   # `bench perf` with no --samplers; False for recompute variants
    switches: tuple[str, ...] = ()
    method = ""

    def __init__(self, network: torch.nn.Module | None = None, tokenizer=None, execution: Execution | None = None):
        self.network = network.eval() if network is not None else None
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.seq_len, self.codebook_size = tokenizer.latent_hw ** 2, tokenizer.codebook_size
        elif network is not None:
            self.seq_len, self.codebook_size = network.cfg.block_size, network.cfg.codebook_size
        else:
            raise BenchError(f"sampler {self.name!r} needs a network or a tokenizer to know its token grid")
        self.options = (execution or Execution()).only(self.switches)
        self.passes_per_image: float | None = None  # network passes per image in the last sample() call

    @classmethod
    def settings(cls, steps: int | None = None, temperature: float | None = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> SamplerSettings:
        """The settings of one of its rows: steps and temperature only where the sampler takes them."""
        if not cls.takes_temperature:
            temperature, top_k, top_p = None, None, None
        return SamplerSettings(cls.name, steps if cls.takes_steps else None, temperature, top_k, top_p)

    def check(self, settings: SamplerSettings) -> None:
        if self.takes_steps and (settings.steps is None or not 1 <= settings.steps <= self.seq_len):
            raise BenchError(f"{self.name} needs steps in 1..{self.seq_len} (the number of tokens), "
                             f"got {settings.steps}")

    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        raise NotImplementedError

    def nfe(self, settings: SamplerSettings) -> int:
        """Full-network forward evaluations per image, as the papers count them."""
        raise NotImplementedError

    def flops_per_image(self, settings: SamplerSettings) -> float | None:
        """Analytic matmul FLOPs of the passes the last sample() call ran; None without a network."""
        return None

    def execution(self) -> str:
        """How this sampler runs, recorded in every row it produces."""
        return f"{self.method}; execution {self.options.spec()} ({self.options.dtype})"


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
