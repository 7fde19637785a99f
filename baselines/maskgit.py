"""MaskGIT-style confidence-ordered parallel decoding (Chang et al., CVPR 2022) with the absorbing
prior's denoiser, no retraining. Not the paper's sampler: rows name it `maskgit`.

At step s of S every masked position gets a draw from softmax(logits / temperature); the draws are
ranked by log-probability plus Gumbel noise scaled by a choice temperature that anneals linearly to
zero, and the least confident ones are masked again, so that after step s exactly
floor(L * cos(pi/2 * (s+1)/S)) positions stay masked (at least one fewer than before, none at the end).
"""
from __future__ import annotations

import math

import torch

from bench.execution import Execution, Network
from bench.models import Transformer
from bench.samplers import FiniteLogits, Sampler, SampleNoise, SamplerSettings, draw_tokens

DEFAULT_CHOICE_TEMPERATURE = 4.5  # MaskGIT's default


def masked_after_step(seq_len: int, steps: int) -> list[int]:
    """How many tokens stay masked after each of the S steps: cosine schedule, strictly decreasing."""
    out, prev = [], seq_len
    for s in range(steps):
        n = math.floor(seq_len * math.cos(math.pi / 2 * (s + 1) / steps))
        n = max(0, min(n, prev - 1))   # reveal at least one token per step
        n = max(n, steps - s - 1) if s < steps - 1 else 0  # leave one per remaining step
        out.append(n)
        prev = n
    return out


class MaskGITSampler(Sampler):
    name = "maskgit"
    prior_kind = "absorbing"  # the absorbing prior's denoiser, no retraining
    switches = ("bf16", "compile", "cuda-graphs")

    def __init__(self, denoiser: Transformer, tokenizer=None, execution: Execution | None = None,
                 choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE):
        super().__init__(denoiser, tokenizer, execution)
        self.denoiser = self.network
        self.net = Network(self.denoiser, self.options)
        self.method = (f"MaskGIT: cosine schedule, choice temperature {choice_temperature:g} annealed linearly, "
                       f"absorbing denoiser")
        self.mask_id = denoiser.cfg.mask_id
        self.choice_temperature = choice_temperature

    @torch.no_grad()
    def sample(self, noise: SampleNoise, settings: SamplerSettings, trace: list | None = None) -> torch.Tensor:
        self.check(settings)
        B, L, S = len(noise), self.seq_len, settings.steps
        x = torch.full((B, L), self.mask_id, dtype=torch.long, device=noise.device)
        finite = FiniteLogits()
        for s, n_masked in enumerate(masked_after_step(L, S)):
            masked = x == self.mask_id
            logits = self.net(x)
            draws = draw_tokens(logits, noise.rand(L), settings.temperature, settings.top_k, settings.top_p, finite)
            logp = logits.float().log_softmax(-1).gather(-1, draws.unsqueeze(-1)).squeeze(-1)
            u = noise.rand(L).clamp_(1e-20, 1 - 1e-7)
            gumbel = -torch.log(-torch.log(u))
            confidence = logp + self.choice_temperature * (1 - (s + 1) / S) * gumbel
            confidence = confidence.masked_fill(~masked, float("inf"))  # revealed tokens stay
            x = torch.where(masked, draws, x)
            if n_masked:
                remask = confidence.argsort(-1)[:, :n_masked]
                x.scatter_(1, remask, self.mask_id)
            if trace is not None:
                trace.append((x != self.mask_id).sum(1))
        finite.check()
        return x

    def nfe(self, settings: SamplerSettings) -> int:
        return settings.steps


    def flops_per_image(self, settings: SamplerSettings) -> float:
        return settings.steps * self.denoiser.cfg.forward_flops(self.seq_len, self.seq_len)
