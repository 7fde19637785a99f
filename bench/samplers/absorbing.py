"""Absorbing-state diffusion over tokens (Bond-Taylor et al., ECCV 2022): the training loss and the
paper's sampler, following the official code's behaviour.

Forward process: at time t in 1..T every token is replaced by the mask id with probability t/T.
Sampling with S steps: all tokens start masked; for t = S..1 each still-masked token is unmasked
with probability 1/t (so t = 1 unmasks all that remain); every step runs one full denoiser pass,
draws every position from softmax(logits / temperature) and writes only the newly unmasked ones.
That is the default; the speed switches skip-idle and head-where-drawn (bench/execution.py) leave out
only work whose result that rule throws away, so they give the same tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BenchError
from ..execution import Execution, Network
from ..models import Transformer
from .base import Sampler, SamplerSettings
from .draw import FiniteLogits, draw_tokens
from .noise import SampleNoise

LOSS_TYPES = ("elbo", "reweighted_elbo", "mlm")


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, total_steps: int, mask_id: int,
                generator: torch.Generator | None = None):
    """q(x_t | x_0): each token masked with probability t / T. -> (x_t, mask)."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    mask = u < (t.float().unsqueeze(-1) / total_steps)
    return x0.masked_fill(mask, mask_id), mask


def loss_from_logits(logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
                     total_steps: int, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (loss, vb_loss) as in the official code, both (B,).

    cross-entropy is summed over masked positions only. With L tokens and uniform t (p(t) = 1/T):
      elbo:            CE / t * T / (L ln 2)                   (bits per token)
      reweighted_elbo: (1 - t/T) * CE / (L ln 2)               (the paper's default)
      mlm:             CE / (number of masked tokens, at least 1)
    vb_loss is always the elbo term, for reporting.
    """
    if loss_type not in LOSS_TYPES:
        raise BenchError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    L = x0.shape[1]
    target = x0.masked_fill(~mask, -1)
    ce = F.cross_entropy(logits.permute(0, 2, 1), target, ignore_index=-1, reduction="none").sum(1)
    t = t.float()
    vb = ce / t * total_steps / (math.log(2) * L)
    if loss_type == "elbo":
        loss = vb
    elif loss_type == "reweighted_elbo":
        loss = (1 - t / total_steps) * ce / (math.log(2) * L)
    else:
        loss = ce / mask.float().sum(1).clamp(min=1)
    return loss, vb


def training_loss(denoiser: Transformer, x0: torch.Tensor, loss_type: str, total_steps: int,
                  generator: torch.Generator | None = None):
    """One training loss: t uniform in 1..T, mask, denoise, score. -> (mean loss, mean vb_loss)."""
    b = x0.shape[0]
    t = torch.randint(1, total_steps + 1, (b,), generator=generator, device=x0.device)
    x_t, mask = mask_tokens(x0, t, total_steps, denoiser.cfg.mask_id, generator)
    loss, vb = loss_from_logits(denoiser(x_t), x0, mask, t, total_steps, loss_type)
    return loss.mean(), vb.mean()


class AbsorbingSampler(Sampler):
    name = "absorbing"
    prior_kind = "absorbing"
    switches = ("bf16", "skip-idle", "head-where-drawn", "compile", "cuda-graphs")
    method = "paper/official: unmask each masked token w.p. 1/t, draw from the denoiser every step"

    def __init__(self, denoiser: Transformer, tokenizer=None, execution: Execution | None = None):
        super().__init__(denoiser, tokenizer, execution)
        self.denoiser = self.network
        self.mask_id = denoiser.cfg.mask_id
        self.net = Network(self.denoiser, self.options, dynamic="skip-idle" in self.options)

    @torch.no_grad()
    def sample(self, noise: SampleNoise, settings: SamplerSettings, trace: list | None = None) -> torch.Tensor:
        """trace, when given, receives the boolean mask of newly unmasked positions at each step."""
        self.check(settings)
        B, L = len(noise), self.seq_len
        skip_idle, head_where_drawn = "skip-idle" in self.options, "head-where-drawn" in self.options
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=noise.device)
        unmasked = torch.zeros((B, L), dtype=torch.bool, device=noise.device)
        every_sample = torch.arange(B, device=noise.device)
        passes, finite = 0, FiniteLogits()
        for t in range(settings.steps, 0, -1):
            changes = (noise.rand(L) < 1.0 / t) & ~unmasked
            unmasked |= changes
            u = noise.rand(L)  # drawn for every sample and position, used or not: streams stay aligned
            if trace is not None:
                trace.append(changes.clone())
            # Only the newly unmasked positions keep their draw, so a sample with none needs no pass
            # (skip-idle) and only those positions need the head and a draw (head-where-drawn).
            rows = changes.any(1).nonzero().squeeze(1) if skip_idle else every_sample
            if len(rows) == 0:
                continue
            passes += len(rows)
            hidden, new = self.net.hidden(x[rows]), changes[rows]
            if head_where_drawn:
                r, p = new.nonzero(as_tuple=True)
                x[rows[r], p] = draw_tokens(self.net.project(hidden[r, p]), u[rows][r, p],
                                            settings.temperature, settings.top_k, settings.top_p, finite)
            else:
                draws = draw_tokens(self.net.project(hidden), u[rows], settings.temperature, settings.top_k,
                                    settings.top_p, finite)
                x[rows] = torch.where(new, draws, x[rows])
        finite.check()
        self.passes_per_image = passes / B
        return x

    def nfe(self, settings: SamplerSettings) -> int:
        """Denoiser passes per image as the paper counts them (skip-idle runs fewer; bench perf
        reports the passes it actually ran)."""
        return settings.steps


    def flops_per_image(self, settings: SamplerSettings) -> float:
        passes = self.passes_per_image if self.passes_per_image is not None else settings.steps
        return passes * self.denoiser.cfg.forward_flops(self.seq_len, self.seq_len)
