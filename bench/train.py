"""Training of the digits models: the VQ tokenizer and the token priors, seeded, with EMA weights.

`bench train --dataset digits --model vq|absorbing|autoregressive|extractor` reproduces the
checkpoints shipped in bench/weights/digits/ (on the same torch version and thread count).
"""
from __future__ import annotations

import copy
import math
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .samplers import absorbing
from .checkpoints import save_checkpoint
from .data import ArrayImages, iterate_batches, to_float
from .errors import BenchError
from .models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig


class EMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p, 1 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())


def _environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def _batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """An endless stream of index batches: shuffled epochs from a seeded generator."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


# ----------------------------------------------------------------------------- VQ tokenizer

@dataclass
class VQTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.99
    kmeans_iters: int = 20
    restart_every: int = 50      # codes unused over this many steps are restarted...
    restart_until: float = 0.6   # ...until this fraction of training, so EMA weights settle after
    seed: int = 0


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Plain Lloyd's k-means; empty clusters are reseeded from random points."""
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            centres[j] = members.mean(0) if len(members) else x[torch.randint(len(x), (1,), generator=generator)][0]
    return centres


def code_statistics(codes: np.ndarray, codebook_size: int) -> dict:
    """Usage (fraction of the codebook that occurs) and perplexity (exp of the code entropy)."""
    counts = np.bincount(codes.reshape(-1), minlength=codebook_size).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "code_usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


@torch.no_grad()
def encode_images(vq: VQAutoEncoder, images, batch_size: int = 256) -> np.ndarray:
    """uint8 images -> codes (N, h, w) int64."""
    return np.concatenate([vq.encode(to_float(b)).numpy() for b in iterate_batches(images, batch_size)])


@torch.no_grad()
def reconstruction_error(vq: VQAutoEncoder, images, batch_size: int = 256) -> float:
    err, n = 0.0, 0
    for b in iterate_batches(images, batch_size):
        x = to_float(b)
        err += (vq(x)[0].clamp(0, 1) - x).abs().mean((1, 2, 3)).sum().item()
        n += len(b)
    return err / n


def train_vq(train: ArrayImages, heldout: ArrayImages, cfg: VQConfig, tc: VQTrainConfig,
             out_stem: str, progress: bool = True) -> dict:
    """L1 reconstruction + codebook/commitment loss. The official VQGAN adds LPIPS and a patch GAN;
    both need downloaded VGG weights and buy little on 16x16 digits, so they are left out here."""
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    model = VQAutoEncoder(cfg)
    data = to_float(train.images)
    batches = _batch_indices(len(data), tc.batch_size, gen)

    # Dead codes: start the codebook on k-means centres of encoder outputs, then restart codes
    # that go unused onto random encoder outputs of the current batch.
    with torch.no_grad():
        z = model.encoder(data[:1024]).permute(0, 2, 3, 1).reshape(-1, cfg.emb_dim)
        model.quantize.embedding.weight.copy_(kmeans(z, cfg.codebook_size, tc.kmeans_iters, gen))
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    ema = EMA(model, tc.ema_decay)
    usage = torch.zeros(cfg.codebook_size)
    restarts = 0
    log = []
    bar = tqdm(range(1, tc.steps + 1), desc="train vq", disable=not progress)
    for step in bar:
        lr = tc.lr * 0.5 * (1 + math.cos(math.pi * step / tc.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = data[next(batches)]
        model.train()
        x_hat, codebook_loss, codes = model(x)
        recon = (x_hat - x).abs().mean()
        loss = recon + codebook_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(codes.reshape(-1), minlength=cfg.codebook_size)
        if step % tc.restart_every == 0:
            dead = (usage == 0).nonzero().squeeze(1)
            if len(dead) and step <= tc.restart_until * tc.steps:
                with torch.no_grad():
                    z = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, cfg.emb_dim)
                    pick = torch.randint(len(z), (len(dead),), generator=gen)
                    model.quantize.embedding.weight[dead] = z[pick] + 1e-3 * torch.randn(len(dead), cfg.emb_dim, generator=gen)
                restarts += len(dead)
            usage.zero_()
        ema.update(model)
        if step % 100 == 0:
            log.append({"step": step, "l1": round(recon.item(), 5), "codebook_loss": round(codebook_loss.item(), 5)})
            bar.set_postfix(l1=f"{recon.item():.4f}")

    final = ema.model
    stats = code_statistics(encode_images(final, heldout), cfg.codebook_size)
    record = {"heldout_l1": reconstruction_error(final, heldout), "code_restarts": restarts,
              "heldout_codes": stats, "train_codes": code_statistics(encode_images(final, train), cfg.codebook_size)}
    meta = {"kind": "vq", "hparams": asdict(cfg), "train": {**asdict(tc), "data": train.content_id()},
            "record": record, "log": log, "environment": _environment()}
    save_checkpoint(out_stem, final.state_dict(), meta)
    return record


# ----------------------------------------------------------------------------- token priors

@dataclass
class PriorTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    loss_type: str = "reweighted_elbo"   # absorbing only
    total_steps: int | None = None       # absorbing T; default: the number of tokens
    seed: int = 0


def prior_loss(model: Transformer, x0: torch.Tensor, tc: PriorTrainConfig, gen: torch.Generator):
    """-> (loss to optimise, loss in bits per token to report)."""
    if model.cfg.causal:
        logits = model(x0[:, :-1])
        ce = F.cross_entropy(logits.permute(0, 2, 1), x0, reduction="none").sum(1)
        bits = ce.mean() / (math.log(2) * x0.shape[1])
        return bits, bits
    T = tc.total_steps or x0.shape[1]
    return absorbing.training_loss(model, x0, tc.loss_type, T, gen)


@torch.no_grad()
def heldout_bits(model: Transformer, tokens: torch.Tensor, tc: PriorTrainConfig, seed: int = 1234) -> float:
    """Held-out loss in bits per token (absorbing: the ELBO term at one random t per sequence)."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    vals = [prior_loss(model, tokens[i:i + 256], tc, gen)[1].item() * len(tokens[i:i + 256])
            for i in range(0, len(tokens), 256)]
    return sum(vals) / len(tokens)


def train_prior(train_tokens: np.ndarray, heldout_tokens: np.ndarray, cfg: TransformerConfig,
                tc: PriorTrainConfig, out_stem: str, source: dict, progress: bool = True) -> dict:
    """train_tokens (N, h, w) codes of the training split. AdamW, linear warm-up, cosine decay."""
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    x = torch.as_tensor(train_tokens).reshape(len(train_tokens), -1)
    x_val = torch.as_tensor(heldout_tokens).reshape(len(heldout_tokens), -1)
    model = Transformer(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))
    ema = EMA(model, tc.ema_decay)
    batches = _batch_indices(len(x), tc.batch_size, gen)
    kind = "autoregressive" if cfg.causal else "absorbing"
    log = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, tc.steps + 1), desc=f"train {kind}", disable=not progress)
    for step in bar:
        lr = tc.lr * min(1.0, step / tc.warmup) * 0.5 * (1 + math.cos(math.pi * step / tc.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        loss, bits = prior_loss(model, x[next(batches)], tc, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        if step % 250 == 0 or step == tc.steps:
            entry = {"step": step, "loss": round(loss.item(), 5), "train_bits": round(bits.item(), 5),
                     "heldout_bits": round(heldout_bits(ema.model, x_val, tc), 5)}
            log.append(entry)
            bar.set_postfix(loss=f"{loss.item():.4f}", heldout=f"{entry['heldout_bits']:.4f}")
    record = {"heldout_bits_per_token": heldout_bits(ema.model, x_val, tc),
              "train_bits_per_token": heldout_bits(ema.model, x, tc),
              "train_seconds": round(time.perf_counter() - t0, 1)}
    meta = {"kind": kind, "hparams": asdict(cfg), "train": {**asdict(tc), **source},
            "record": record, "log": log, "environment": _environment()}
    save_checkpoint(out_stem, ema.model.state_dict(), meta)
    return record


# ----------------------------------------------------------------------------- the shipped recipes

def digits_prior_config(vq_cfg: VQConfig, causal: bool) -> TransformerConfig:
    """The digits priors: small enough that a 1000-sample sweep runs in minutes on a CPU."""
    return TransformerConfig(codebook_size=vq_cfg.codebook_size, block_size=vq_cfg.latent_hw ** 2,
                             n_layers=4, n_head=4, n_emb=96, causal=causal,
                             embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)


def train_model(cfg, ds, model: str, out_stem: str, seed: int = 0, steps: int | None = None,
                progress: bool = True) -> dict:
    """`bench train`: the recipe that made the shipped digits checkpoint of `model`."""
    from .data import digits_split
    from .data import DigitsSource
    from .loading import load_vq
    if not isinstance(ds.source, DigitsSource):
        raise BenchError(f"bench train supports the embedded digits data only; {ds.name!r} is {ds.kind!r}")
    split = dict(resolution=ds.resolution, heldout_size=ds.source.heldout_size, split_seed=ds.source.split_seed)
    train, heldout = digits_split("train", **split), digits_split("heldout", **split)
    if model == "extractor":
        from .features import train_digits_extractor
        return train_digits_extractor(out_stem, seed=seed)
    if model == "vq":
        tc = VQTrainConfig(seed=seed, **({"steps": steps} if steps else {}))
        return train_vq(train, heldout, VQConfig(img_size=ds.resolution, n_channels=ds.channels), tc, out_stem, progress)
    vq, _ = load_vq(ds.tokenizer)
    from .checkpoints import checkpoint_sha256
    source = {"tokenizer": ds.tokenizer, "tokenizer_sha256": checkpoint_sha256(ds.tokenizer), "data": train.content_id()}
    tc = PriorTrainConfig(seed=seed, **({"steps": steps} if steps else {}))
    return train_prior(encode_images(vq, train), encode_images(vq, heldout),
                       digits_prior_config(vq.cfg, causal=model == "autoregressive"), tc, out_stem, source, progress)
