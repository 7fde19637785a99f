"""Training of the digits models: the VQ tokenizer and the token priors, seeded, with EMA weights.

`bench train --dataset digits --model vq|absorbing|autoregressive|extractor --out STEM` reproduces the
checkpoints shipped in bench/weights/digits/ (on the same torch version and thread count). The priors
are selected by held-out loss (early stopping) and their training resumes from STEM.resume.pt.
"""
from __future__ import annotations

import copy
import io
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .samplers import absorbing
from .checkpoints import WEIGHTS_DIR, atomic_write_bytes, check_folder, resolve, save_checkpoint
from .data import ArrayImages, iterate_batches, to_float
from .errors import BenchError, reason
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
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "python": platform.python_version()}


class Batches:
    """An endless stream of index batches: shuffled epochs from a seeded generator (the last partial
    batch of an epoch is dropped). Its position can be saved and restored with the generator's state."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm, self.pos = None, 0

    def next(self) -> torch.Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        self.pos += self.batch_size
        return self.perm[self.pos - self.batch_size:self.pos]

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], state["pos"]


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
    batches = Batches(len(data), tc.batch_size, gen)

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
        x = data[batches.next()]
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
    steps: int = 6000            # the most steps; the cosine schedule spans them, early stopping may end sooner
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    loss_type: str = "reweighted_elbo"   # absorbing only
    total_steps: int | None = None       # absorbing T; default: the number of tokens
    eval_every: int = 250        # held-out loss of the EMA weights, best kept, resume state written
    eval_draws: int = 8          # absorbing: fixed t draws per held-out sequence, one in each eighth of 1..T
    min_gain: float = 0.01       # stop once the best held-out loss fell by less than this over the last quarter
    min_steps: int = 1000        # ...but not before this step
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


class HeldOut:
    """A fixed evaluation in bits per token: the same masks and t at every call, so two calls differ
    only by the model. Autoregressive: the exact NLL. Absorbing: the ELBO (the `elbo` term of
    absorbing.loss_from_logits) averaged over tc.eval_draws t per sequence, t stratified over 1..T."""

    def __init__(self, tokens: torch.Tensor, cfg: TransformerConfig, tc: PriorTrainConfig, seed: int = 1234):
        self.causal = cfg.causal
        self.x0 = tokens
        if not self.causal:
            N, L = tokens.shape
            self.T = tc.total_steps or L
            gen = torch.Generator().manual_seed(seed)
            k = torch.arange(tc.eval_draws).repeat_interleave(N)
            v = (k + torch.rand(len(k), generator=gen)) / tc.eval_draws  # uniform in [0, 1), one per stratum
            self.t = 1 + (v * self.T).long().clamp(max=self.T - 1)
            self.x0 = tokens.repeat(tc.eval_draws, 1)
            self.x_t, self.mask = absorbing.mask_tokens(self.x0, self.t, self.T, cfg.mask_id, gen)

    @torch.no_grad()
    def bits(self, model: Transformer, batch_size: int = 500) -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(self.x0), batch_size):
            x0 = self.x0[i:i + batch_size]
            if self.causal:
                ce = F.cross_entropy(model(x0[:, :-1]).permute(0, 2, 1), x0, reduction="none").sum(1)
                total += (ce / (math.log(2) * x0.shape[1])).sum().item()
            else:
                logits = model(self.x_t[i:i + batch_size])
                _, vb = absorbing.loss_from_logits(logits, x0, self.mask[i:i + batch_size],
                                                   self.t[i:i + batch_size], self.T, "elbo")
                total += vb.sum().item()
        return total / len(self.x0)


def plateaued(log: list, step: int, min_gain: float) -> tuple[bool, float | None]:
    """-> (whether the best held-out loss fell by less than min_gain (relative) from step 3/4 * step
    to step, that relative fall). The fall is None until an evaluation lies in the first three quarters."""
    before = [e["heldout_bits"] for e in log if e["step"] <= 0.75 * step]
    if not before:
        return False, None
    then, now = min(before), min(e["heldout_bits"] for e in log if e["step"] <= step)
    gain = (then - now) / then
    return gain < min_gain, gain


def training_flops(cfg: TransformerConfig, samples: int) -> float:
    """Analytic matmul FLOPs of training on `samples` sequences: forward + backward = 3 x forward,
    forward as TransformerConfig.forward_flops (2 x matmul weights x L plus attention, per sequence of L tokens)."""
    return 3 * cfg.forward_flops(cfg.block_size, cfg.block_size) * samples


FLOPS_FORMULA = ("3 x samples_seen x L x (n_layers x (24 d^2 + 4 L d) + 2 d V): forward + backward "
                 "(= 6 x matmul weights x tokens, plus attention); d width, L tokens, V codebook; "
                 "held-out evaluations not counted")


def resume_path(out_stem: str) -> Path:
    return Path(f"{resolve(out_stem)}.resume.pt")


def save_resume(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


RESUME_STATE = ("config", "hparams", "source", "step", "log", "best", "best_step", "best_bits", "seconds",
                "sittings", "stopped", "model", "ema", "opt", "gen", "rng", "batches")


def read_resume(path: Path) -> dict:
    """A resume state `bench train` wrote, or a BenchError saying what is wrong with the file."""
    if not path.is_file():
        raise BenchError(f"no resume state {path}; start without --resume")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # truncated or foreign file: say which
        raise BenchError(f"resume state {path} is unreadable ({reason(e)})") from None
    missing = [k for k in RESUME_STATE if not isinstance(state, dict) or k not in state]
    if missing or any(not isinstance(state[k], dict) for k in ("config", "hparams", "source")):
        raise BenchError(f"resume state {path} is not one `bench train` wrote (it lacks "
                         f"{', '.join(missing) or 'its config tables'}); delete it to start afresh")
    return state


def load_resume(path: Path, tc: PriorTrainConfig, cfg: TransformerConfig, source: dict) -> dict:
    state = read_resume(path)
    for key, ours in (("config", asdict(tc)), ("hparams", asdict(cfg)), ("source", source)):
        if state[key] != ours:
            diff = sorted(k for k in ours if state[key].get(k) != ours[k])
            raise BenchError(f"resume state {path} was made with other {key} (differs in {diff}); "
                             "rerun with the same options or start afresh under another --out")
    return state


def train_prior(train_tokens: np.ndarray, heldout_tokens: np.ndarray, cfg: TransformerConfig,
                tc: PriorTrainConfig, out_stem: str, source: dict, progress: bool = True,
                resume: bool = False) -> dict:
    """train_tokens (N, h, w) codes of the training split. AdamW, linear warm-up, cosine decay over
    tc.steps, EMA weights. Every tc.eval_every steps the EMA weights are scored on the held-out split
    (HeldOut), the best are kept, and the whole state is written to <out>.resume.pt; training stops
    when the best held-out loss fell by less than tc.min_gain over the last quarter of the steps run
    (early stopping) or at tc.steps. The checkpoint holds the best EMA weights."""
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
    batches = Batches(len(x), tc.batch_size, gen)
    heldout = HeldOut(x_val, cfg, tc)
    kind = "autoregressive" if cfg.causal else "absorbing"
    rpath = resume_path(out_stem)
    if resume:
        state = load_resume(rpath, tc, cfg, source)
        if state["stopped"] and resolve(out_stem).with_suffix(".json").is_file():
            raise BenchError(f"training in {rpath} already finished ({state['stopped']}); "
                             f"its checkpoint is {resolve(out_stem)}.safetensors")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        batches.load_state_dict(state["batches"])
    else:
        if rpath.exists():
            raise BenchError(f"{rpath} holds an unfinished or earlier training: continue it with --resume, "
                             "or delete it to start afresh")
        state = {"config": asdict(tc), "hparams": asdict(cfg), "source": source, "step": 0, "log": [],
                 "best": copy.deepcopy(ema.model.state_dict()), "best_step": 0, "best_bits": math.inf,
                 "seconds": 0.0, "sittings": [], "stopped": ""}
    sitting = {"from_step": state["step"], **_environment()}
    state["sittings"].append(sitting)
    log, step = state["log"], state["step"]
    t0, seconds0 = time.perf_counter(), state["seconds"]
    last = step if state["stopped"] else tc.steps  # stopped, but killed before the checkpoint was written
    bar = tqdm(range(step + 1, last + 1), desc=f"train {kind}", disable=not progress, initial=step, total=tc.steps)
    for step in bar:
        lr = tc.lr * min(1.0, step / tc.warmup) * 0.5 * (1 + math.cos(math.pi * step / tc.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        loss, bits = prior_loss(model, x[batches.next()], tc, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        if step % tc.eval_every == 0 or step == tc.steps:
            val = heldout.bits(ema.model)
            if val < state["best_bits"]:
                state["best"] = copy.deepcopy(ema.model.state_dict())
                state["best_bits"], state["best_step"] = val, step
            log.append({"step": step, "lr": lr, "loss": round(loss.item(), 5), "train_bits": round(bits.item(), 5),
                        "heldout_bits": round(val, 5)})
            stop, gain = plateaued(log, step, tc.min_gain)
            if stop and step >= tc.min_steps:
                state["stopped"] = (f"plateau: the best held-out loss fell {100 * gain:.2f}% over the last quarter "
                                    f"(steps {int(0.75 * step)}..{step}), under {100 * tc.min_gain:g}%")
            elif step == tc.steps:
                fall = "n/a" if gain is None else f"{100 * gain:.2f}%"
                state["stopped"] = (f"cap: reached the most steps ({tc.steps}); the best held-out loss fell {fall} "
                                    f"over the last quarter")
            state.update(step=step, seconds=seconds0 + time.perf_counter() - t0, model=model.state_dict(),
                         ema=ema.model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                         rng=torch.get_rng_state(), batches=batches.state_dict())
            sitting["to_step"] = step
            save_resume(rpath, state)
            bar.set_postfix(loss=f"{loss.item():.4f}", heldout=f"{val:.4f}", best=f"{state['best_bits']:.4f}")
            if state["stopped"]:
                break

    best = Transformer(cfg)
    best.load_state_dict(state["best"])
    samples = state["step"] * tc.batch_size
    record = {"heldout_bits_per_token": heldout.bits(best),
              "train_bits_per_token": HeldOut(x, cfg, tc).bits(best),
              "best_heldout_bits": state["best_bits"],
              "selected_step": state["best_step"],
              "steps_run": state["step"],
              "stopped": state["stopped"],
              "samples_seen": samples,
              "selected_samples_seen": state["best_step"] * tc.batch_size,
              "train_seconds": round(state["seconds"], 1),
              "train_flops": training_flops(cfg, samples),
              "selected_train_flops": training_flops(cfg, state["best_step"] * tc.batch_size),
              "flops_formula": FLOPS_FORMULA,
              "parameters": sum(p.numel() for p in best.parameters()),
              "heldout_eval": ("exact NLL" if cfg.causal else
                               f"ELBO over {tc.eval_draws} fixed stratified t per sequence") + ", EMA weights"}
    meta = {"kind": kind, "hparams": asdict(cfg), "train": {**asdict(tc), **source},
            "record": record, "log": log, "sittings": state["sittings"], "environment": _environment()}
    save_checkpoint(out_stem, best.state_dict(), meta)
    return record


# ----------------------------------------------------------------------------- the shipped recipes

def digits_prior_config(vq_cfg: VQConfig, causal: bool) -> TransformerConfig:
    """The digits priors: small enough that a 1000-sample sweep runs in minutes on a CPU."""
    return TransformerConfig(codebook_size=vq_cfg.codebook_size, block_size=vq_cfg.latent_hw ** 2,
                             n_layers=4, n_head=4, n_emb=96, causal=causal,
                             embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)


def check_output(out: str | None, dataset: str, model: str, replace_shipped: bool) -> str:
    """The checkpoint stem to write: `out`, or the shipped one only when replace_shipped says so."""
    shipped = f"builtin:{dataset}/{model}"
    out = out or shipped
    inside = resolve(out).resolve().is_relative_to(WEIGHTS_DIR.resolve())
    if inside and not replace_shipped:
        raise BenchError(f"{out} is a shipped checkpoint (in {WEIGHTS_DIR}); write elsewhere with --out STEM, "
                         "or pass --replace-shipped to overwrite it")
    from .checkpoints import check_name_lengths
    stem = resolve(out)
    check_name_lengths(stem.with_suffix(".resume.pt"), f"--out {out}")
    check_folder(stem.parent, f"--out {out}")
    return out


MODELS = ("vq", "absorbing", "autoregressive", "extractor")


def train_model(cfg, ds, model: str, out_stem: str, seed: int = 0, steps: int | None = None,
                progress: bool = True, resume: bool = False) -> dict:
    """`bench train`: the recipe of the shipped digits checkpoint of `model`. steps: training steps
    (the priors: the most steps, early stopping may end sooner); resume: continue a prior's training."""
    from .data import DigitsSource, digits_split
    from .loading import load_vq
    if model not in MODELS:
        raise BenchError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    if not isinstance(ds.source, DigitsSource):
        raise BenchError(f"bench train supports the embedded digits data only; {ds.name!r} is {ds.kind!r}")
    if resume and model not in ("absorbing", "autoregressive"):
        raise BenchError(f"--resume applies to the priors (absorbing, autoregressive), not {model!r}: it trains in minutes")
    if resume:
        read_resume(resume_path(out_stem))  # before the tokens are made
    split = dict(resolution=ds.resolution, heldout_size=ds.source.heldout_size, split_seed=ds.source.split_seed)
    train, heldout = digits_split("train", **split), digits_split("heldout", **split)
    if model == "extractor":
        from .features import train_digits_extractor
        return train_digits_extractor(out_stem, seed=seed, steps=steps)
    if model == "vq":
        tc = VQTrainConfig(seed=seed, **({"steps": steps} if steps else {}))
        return train_vq(train, heldout, VQConfig(img_size=ds.resolution, n_channels=ds.channels), tc, out_stem, progress)
    vq, _ = load_vq(ds.tokenizer)
    from .checkpoints import checkpoint_sha256
    source = {"tokenizer": ds.tokenizer, "tokenizer_sha256": checkpoint_sha256(ds.tokenizer), "data": train.content_id()}
    tc = PriorTrainConfig(seed=seed, **({"steps": steps} if steps else {}))
    return train_prior(encode_images(vq, train), encode_images(vq, heldout),
                       digits_prior_config(vq.cfg, causal=model == "autoregressive"), tc, out_stem, source, progress,
                       resume)
