"""Cached sampling throughput of the `taming` sampler against the harness's cached `autoregressive`
sampler, at the shape of Taming's released FFHQ transformer, on this machine (random weights).

    python scripts/taming_throughput.py [--batch 2] [--tokens 4] [--repeats 3] [--threads 1] [--late]

Shape (the release's configs/2021-04-23T18-19-01-project.yaml): mingpt.GPT with vocab_size 1024,
block_size 256, n_layer 24, n_head 16, n_embd 1664 (802M parameters), on a 16x16 grid of a
1024-code first stage. The harness's bench.models.Transformer gets the same shape and shares the
very same weight tensors (it adds its learned start token), so both samplers read the same 3.2 GB
per step.

What is timed: each sampler's own sample() over the first --tokens tokens of a sequence (its
seq_len cut to that many), --repeats times, the two samplers alternating so that load from other
processes hits both alike; the median seconds per token, times 256, is the time of one full
sequence (for the whole batch). A step reads all weights once and the key/value cache of its
context, which at 256 positions is 2.6% of the weight bytes, so per-token cost grows little with
position; --late times network steps near position 255 (after an untimed prefill) to show by how much.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from baselines.autoregressive import AutoregressiveSampler  # noqa: E402
from baselines.taming import TamingSampler  # noqa: E402
from baselines.taming_models import TamingGPT, TamingGPTConfig  # noqa: E402
from bench.models import Transformer, TransformerConfig  # noqa: E402
from bench.samplers import SampleNoise, SamplerSettings  # noqa: E402

FFHQ = dict(vocab_size=1024, block_size=256, n_layer=24, n_head=16, n_embd=1664)
GRID = 16


class GridOnly:
    """What a sampler reads of its tokenizer: the grid and codebook (decoding is not timed here)."""
    name, latent_hw, codebook_size = "ffhq-shape", GRID, FFHQ["vocab_size"]


def networks() -> tuple[TamingGPT, Transformer]:
    torch.manual_seed(0)
    gpt = TamingGPT(TamingGPTConfig(**FFHQ)).eval()
    with torch.no_grad():
        for name, p in gpt.named_parameters():  # Taming's initialisation: N(0, 0.02), LayerNorm 1 / 0
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    cfg = TransformerConfig(codebook_size=FFHQ["vocab_size"], block_size=FFHQ["block_size"],
                            n_layers=FFHQ["n_layer"], n_head=FFHQ["n_head"], n_emb=FFHQ["n_embd"], causal=True)
    with torch.device("meta"):
        ar = Transformer(cfg)
    shared = {k: v for k, v in gpt.state_dict().items() if not k.endswith(".attn.mask")}
    shared["start_tok"] = torch.zeros(1, 1, cfg.n_emb)
    ar.load_state_dict(shared, assign=True)  # the same tensors, no second copy
    return gpt, ar.eval()


def time_tokens(sampler, name: str, batch: int, tokens: int, settings: SamplerSettings) -> float:
    sampler.seq_len = tokens
    start = time.perf_counter()
    sampler.sample(SampleNoise(0, range(batch)), settings)
    return (time.perf_counter() - start) / tokens


@torch.no_grad()
def late_steps(nets: dict, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds per network step near the end of the sequence (after an untimed prefill),
    the networks alternating as above."""
    position = GRID * GRID - 1 - tokens * repeats
    caches = {}
    for name, (step, new_cache) in nets.items():
        caches[name] = new_cache(batch)
        step(torch.zeros((batch, position), dtype=torch.long), caches[name])
    runs: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(repeats):
        for name, (step, _) in nets.items():
            start = time.perf_counter()
            for _ in range(tokens):
                step(torch.zeros((batch, 1), dtype=torch.long), caches[name])
            runs[name].append((time.perf_counter() - start) / tokens)
    return {name: statistics.median(r) for name, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4, help="tokens timed per repeat (a sequence has 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--late", action="store_true", help="also time steps at positions 248..")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gpt, ar = networks()
    L = GRID * GRID
    samplers = {"taming": TamingSampler(gpt, GridOnly()), "autoregressive": AutoregressiveSampler(ar, use_cache=True)}
    settings = {"taming": SamplerSettings("taming", temperature=1.0, top_k=250, top_p=1.0),
                "autoregressive": SamplerSettings("autoregressive", temperature=1.0, top_k=250)}
    for name, sampler in samplers.items():  # warm-up
        time_tokens(sampler, name, args.batch, 1, settings[name])
    per_token: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(args.repeats):
        for name, sampler in samplers.items():
            per_token[name].append(time_tokens(sampler, name, args.batch, args.tokens, settings[name]))
    print(f"FFHQ transformer shape {FFHQ}, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"{args.tokens} tokens x {args.repeats} repeats per sampler, medians")
    print(f"{'sampler':<16}{'s/token':>10}{'s/sequence':>12}{'img/s':>10}{'tokens/s':>10}   runs (s/token)")
    for name, runs in per_token.items():
        s = statistics.median(runs)
        print(f"{name:<16}{s:>10.3f}{s * L:>12.1f}{args.batch / (s * L):>10.4f}{args.batch / s:>10.3f}   "
              f"{', '.join(f'{r:.3f}' for r in runs)}")
    if args.late:
        late = late_steps({"taming": (gpt.hidden, gpt.new_cache), "autoregressive": (ar.hidden, ar.new_cache)},
                          args.batch, args.tokens, args.repeats)
        print(f"network steps at positions {L - 1 - args.tokens * args.repeats}..{L - 2}, s/step: "
              + ", ".join(f"{name} {s:.3f} ({s / statistics.median(per_token[name]):.2f}x the sampler's "
                          f"first tokens)" for name, s in late.items()))

if __name__ == "__main__":
    main()
