"""The token draw every sampler shares: temperature, top-k / top-p filtering, inverse-CDF categorical."""
from __future__ import annotations

import torch

from ..errors import BenchError


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
