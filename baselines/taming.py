"""Sampling a Taming Transformers release as its scripts/sample_fast.py does, with the harness's draws.

`taming`: raster order with a key/value cache (mingpt.sample_with_past). `taming-recompute`: the
same network, draws and tokens, the whole prefix recomputed for every token (the execution of
Net2NetTransformer.sample), to show that the cache changes nothing.

What is Taming's here:
- the start: an unconditional release feeds its `sos_token` (default 0, an ordinary code) at
  position 0; the logits there predict the first code, those at position i the code i;
- the filtering: logits[:, -1] / temperature, then transformers 4.3.1's top_k_top_p_filtering,
  which sample_with_past applies only when top_k is given: top-k keeps every logit >= the k-th
  largest; top-p sorts the survivors, takes the cumulative softmax and removes a token when the
  tokens ranked above it already sum to more than top_p (strictly more; the first always stays).
  top_p 1.0 (sample_fast.py's default) is applied too: in float32 the cumulative sum can pass 1.0
  in the tail and so drop tokens of negligible probability, exactly as Taming does. top_p without
  top_k is refused, since Taming would silently ignore it;
- decoding: the release's own first stage and sample_fast.py's 8-bit conversion (the tokenizer).

What is the harness's: the categorical draw inverts the CDF with one uniform per position from the
sample's own stream (bench.samplers.draw_tokens), so sample i depends only on (seed, i); Taming's
torch.multinomial draws are not reproduced (nor reproducible across batch sizes). Temperature 0
means argmax, as for every sampler. bench.samplers.filter_logits is not used: its top-p keeps a
token when the tokens above it reach top_p (>=, not >) and skips top_p = 1.0.
"""
from __future__ import annotations

import torch

from baselines.autoregressive import draw_in_raster_order
from baselines.taming_models import TamingGPT
from bench.errors import BenchError
from bench.execution import Execution
from bench.samplers import FiniteLogits, Sampler, SampleNoise, SamplerSettings, draw_tokens


def taming_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Every logit below the k-th largest set to -inf (ties with it stay), k clamped to 1..V."""
    k = min(max(int(top_k), 1), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def taming_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens sorted by logit; a token is set to -inf when the probabilities of the tokens ranked
    above it sum to more than top_p (the most likely token always stays)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # the token that crosses top_p stays
    drop[..., 0] = False
    drop = drop.scatter(-1, order, drop)
    return logits.masked_fill(drop, float("-inf"))


def taming_filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Taming's filtering of (B, V) logits (already divided by the temperature): nothing without
    top_k, else top-k then top-p (top_p None meaning sample_fast.py's default, 1.0)."""
    if top_k is None:
        return logits
    return taming_top_p(taming_top_k(logits, top_k), 1.0 if top_p is None else float(top_p))


def taming_draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, finite: FiniteLogits | None = None) -> torch.Tensor:
    """One code per row of (B, V) logits: argmax at temperature 0, else Taming's filtering and the
    harness's inverse-CDF draw with one uniform per row."""
    if temperature == 0:
        return draw_tokens(logits, uniforms, 0, finite=finite)
    finite = finite or FiniteLogits()
    finite.note(logits)  # NaN / +inf are refused before filtering could hide them
    filtered = taming_filter(logits.float() / temperature, top_k, top_p)
    return draw_tokens(filtered, uniforms, 1.0, finite=finite)


class TamingSampler(Sampler):
    """Taming's cached sampling of an unconditional release (mingpt.sample_with_past)."""
    name = "taming"
    prior_kind = "taming"
    takes_steps = False
    switches = ("bf16",)
    use_cache = True
    method = ("Taming Transformers (sample_fast.py): raster order from the sos token, key/value cache, "
              "top-k then top-p as transformers 4.3.1")

    def __init__(self, network: TamingGPT, tokenizer, execution: Execution | None = None):
        # the protocol decodes this sampler's rows with `tokenizer`: the release's own first stage
        super().__init__(network, tokenizer, execution)
        self.gpt = self.network
        cfg = network.cfg
        if cfg.vocab_size != tokenizer.codebook_size or cfg.block_size < self.seq_len:
            raise BenchError(f"Taming GPT (vocab {cfg.vocab_size}, block {cfg.block_size}) does not fit tokenizer "
                             f"{tokenizer.name} (codebook {tokenizer.codebook_size}, {self.seq_len} tokens)")
        self.options.check_device(network.head.weight.device)

    def check(self, settings: SamplerSettings) -> None:
        super().check(settings)
        if settings.top_p is not None and settings.top_k is None:
            raise BenchError(f"{self.name}: top_p without top_k; Taming's sampler applies top-p only together with "
                             f"top-k (its FFHQ default: top_k 250, top_p 1.0)")

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.options.autocast(hidden.device):
            return self.gpt.project(hidden).float()

    @torch.no_grad()
    def sample(self, noise: SampleNoise, settings: SamplerSettings) -> torch.Tensor:
        self.check(settings)
        sos = torch.full((len(noise), 1), self.gpt.cfg.sos_token, dtype=torch.long, device=noise.device)
        cache = self.gpt.new_cache(len(noise), torch.bfloat16 if "bf16" in self.options else None) \
            if self.use_cache else None

        def logits_at(i: int, x: torch.Tensor) -> torch.Tensor:
            """Position i of the network's input holds the sos token (i = 0) or code i - 1."""
            with self.options.autocast(noise.device):
                if cache is not None:
                    hidden = self.gpt.hidden(x[:, i - 1:i] if i else sos, cache)
                else:
                    hidden = self.gpt.hidden(torch.cat((sos, x[:, :i]), dim=1))
            return self._logits(hidden[:, -1])

        def draw(logits, uniforms, finite):
            return taming_draw(logits, uniforms, settings.temperature, settings.top_k, settings.top_p, finite)
        x = draw_in_raster_order(noise, self.seq_len, logits_at, draw)
        self.passes_per_image = float(self.seq_len)
        return x

    def nfe(self, settings: SamplerSettings) -> int:
        return self.seq_len

    def flops_per_image(self, settings: SamplerSettings) -> float:
        """Cached: one new token per step attending to the cache. Recomputed: the whole prefix
        (sos token included) every step, the head at the last position only."""
        cfg = self.gpt.cfg
        if self.use_cache:
            return sum(cfg.forward_flops(1, i + 1) for i in range(self.seq_len))
        return sum(cfg.forward_flops(i + 1, i + 1, head_tokens=1) for i in range(self.seq_len))


class TamingRecomputeSampler(TamingSampler):
    """The same network, draws and tokens as `taming`, without the cache: the execution of
    Net2NetTransformer.sample. (Its filtering is sample_fast.py's, as for `taming`; Taming's own
    uncached sample() applies top-k only, which matters only where top-p would remove tokens.)"""
    name = "taming-recompute"
    use_cache = False
    timed_by_default = False
    method = ("Taming Transformers: raster order from the sos token, whole prefix recomputed per token "
              "(Net2NetTransformer.sample), top-k then top-p as transformers 4.3.1")
