"""Checkpoint references -> tokenizers and priors, each checked against what it claims to be.

A reference is written in bench.toml (or given on the command line) as one of:

    builtin:digits/vq           a harness checkpoint shipped in bench/weights/
    path/to/stem                a harness checkpoint: stem.safetensors (tensors) + stem.json (hparams)
    path/to/vqgan_ema_<N>.th    an official Unleashing Transformers file (bench.loading.official),
                                whose architecture comes from `official_hparams`
    path/to/<release folder>    a Taming Transformers release (bench.loading.taming): checkpoints/last.ckpt
                                and configs/*-project.yaml, the prior of kind `taming`, which brings its
                                own first stage as its tokenizer

A `Tokenizer` turns 8-bit images into codes and back; a `Prior` is a token network of one kind
(the key of a dataset's `priors` table), and may bring its own tokenizer (a prior trained on
another first stage), in which case its samplers' rows are decoded by that tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import checkpoint_sha256, load_checkpoint, load_state_strict, resolve
from ..data import to_float, to_uint8
from ..errors import BenchError
from ..models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig

@dataclass(frozen=True)
class PriorKind:
    brings_tokenizer: bool = False   # a release with its own first stage (Taming)
    causal: bool = False             # harness transformers: causal (autoregressive) or bidirectional


# the keys of a dataset's `priors` table
PRIOR_KINDS = {"absorbing": PriorKind(), "autoregressive": PriorKind(causal=True),
               "taming": PriorKind(brings_tokenizer=True, causal=True)}


class Tokenizer:
    """A VQ first stage: 8-bit images <-> token grids. `name` is recorded in every row it decodes."""
    name: str
    sha256: str
    codebook_size: int
    latent_hw: int      # tokens per side; a grid holds latent_hw ** 2 tokens
    img_size: int
    channels: int

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, C) -> int64 (B, L)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """int64 (B, L) -> uint8 (B, H, W, C)."""
        raise NotImplementedError

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Images through the first stage and back: what the tokenizer can express at best."""
        return self.decode(self.encode(images))

    def to(self, device) -> "Tokenizer":
        raise NotImplementedError

    def check_images(self, resolution: int, channels: int, dataset: str) -> None:
        """Refuse a dataset whose images this tokenizer does not make: never resize silently."""
        if self.img_size != resolution or self.channels != channels:
            raise BenchError(f"tokenizer {self.name} is for {self.img_size}px x {self.channels} channels, "
                             f"dataset {dataset} is {resolution}px x {channels}")


class VQTokenizer(Tokenizer):
    """The harness's VQ autoencoder (bench.models.VQAutoEncoder): images in [0, 1], rounded to 8 bits."""

    def __init__(self, vq: VQAutoEncoder, name: str, sha256: str, meta: dict | None = None):
        self.vq, self.name, self.sha256, self.meta = vq.eval(), name, sha256, meta or {}
        c = vq.cfg
        self.codebook_size, self.latent_hw, self.img_size, self.channels = (
            c.codebook_size, c.latent_hw, c.img_size, c.n_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vq.parameters()).device

    def to(self, device) -> "VQTokenizer":
        self.vq.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        return self.vq.encode(to_float(images, self.device)).reshape(len(images), -1)

    @torch.no_grad()
    def decode(self, tokens) -> np.ndarray:
        tokens = torch.as_tensor(tokens, device=self.device)
        hw = self.latent_hw
        return to_uint8(self.vq.decode(tokens.reshape(len(tokens), hw, hw)))


@dataclass
class Prior:
    """A token network of one kind, loaded from `source`."""
    kind: str
    network: torch.nn.Module
    source: str
    sha256: str
    codebook_size: int
    seq_len: int
    tokenizer: Tokenizer | None = None   # set where the prior brings its own first stage
    meta: dict = field(default_factory=dict)

    def to(self, device) -> "Prior":
        self.network.to(device)
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        return self

    def check_fits(self, tokenizer: Tokenizer) -> None:
        if self.codebook_size != tokenizer.codebook_size or self.seq_len != tokenizer.latent_hw ** 2:
            raise BenchError(f"prior {self.source} expects codebook {self.codebook_size} and {self.seq_len} tokens; "
                             f"tokenizer {tokenizer.name} has codebook {tokenizer.codebook_size} and "
                             f"{tokenizer.latent_hw ** 2} tokens")


# ----------------------------------------------------------------------------- references

def is_official(ref) -> bool:
    """An official Unleashing Transformers file (vqgan_ema_<step>.th, ...), read by bench.loading.official."""
    return str(ref).endswith(".th")


def _official_hparams_needed(ref):
    return BenchError(f"official checkpoint {ref} carries no hyperparameters: set official_hparams for this "
                      f"dataset in bench.toml (a preset: churches, bedrooms, ffhq, or a table of official flags)")


def _network(meta: dict, stem, config_cls, network_cls):
    """The network a harness checkpoint's `hparams` describe; every problem names the JSON file."""
    where = resolve(stem).with_suffix(".json")
    hparams = meta.get("hparams")
    if not isinstance(hparams, dict):
        raise BenchError(f"checkpoint {where} has no `hparams` object; "
                         f"expected the JSON that `bench train` or `bench convert` writes")
    try:
        cfg = config_cls.from_dict(hparams)
    except BenchError as e:
        raise BenchError(f"checkpoint {where}: {e}") from None
    try:
        return network_cls(cfg)
    except (AssertionError, ValueError, RuntimeError, ZeroDivisionError, IndexError) as e:
        raise BenchError(f"checkpoint {where}: its hparams do not make a {network_cls.__name__} "
                         f"({type(e).__name__}: {e or 'inconsistent sizes'})") from None


def load_vq(ref, official_hparams=None, trust: bool = False) -> tuple[VQAutoEncoder, dict]:
    """A harness checkpoint, or an official .th file with its official hyperparameters."""
    if is_official(ref):
        from .official import load_official_vq
        if official_hparams is None:
            raise _official_hparams_needed(ref)
        return load_official_vq(ref, official_hparams, trust)
    state, meta = load_checkpoint(ref, kind="vq")
    model = _network(meta, ref, VQConfig, VQAutoEncoder)
    load_state_strict(model, state, str(ref))
    return model.eval(), meta


def load_transformer(ref, kind: str, official_hparams=None, trust: bool = False) -> tuple[Transformer, dict]:
    """kind: 'absorbing' (bidirectional denoiser) or 'autoregressive' (causal prior)."""
    if is_official(ref):
        from .official import load_official_transformer
        if official_hparams is None:
            raise _official_hparams_needed(ref)
        return load_official_transformer(ref, kind, official_hparams, trust)
    state, meta = load_checkpoint(ref, kind=kind)
    model = _network(meta, ref, TransformerConfig, Transformer)
    if model.cfg.causal != (kind == "autoregressive"):
        raise BenchError(f"checkpoint {ref}: kind {kind!r} but hparams.causal={model.cfg.causal}")
    load_state_strict(model, state, str(ref))
    return model.eval(), meta


def load_tokenizer(ref: str, official_hparams=None, trust: bool = False) -> Tokenizer:
    vq, meta = load_vq(ref, official_hparams, trust)
    return VQTokenizer(vq, str(ref), checkpoint_sha256(ref), meta)


def load_prior(ref: str, kind: str, official_hparams=None, trust: bool = False) -> Prior:
    """The prior of `kind` (a key of a dataset's `priors` table) at reference `ref`."""
    if kind not in PRIOR_KINDS:
        raise BenchError(f"prior kind {kind!r} is not known; expected one of {', '.join(PRIOR_KINDS)}")
    if kind == "taming":
        from .taming import load_taming
        tokenizer, gpt, meta = load_taming(ref)
        return Prior(kind, gpt, str(ref), meta["source"]["sha256"], tokenizer.codebook_size,
                     tokenizer.latent_hw ** 2, tokenizer=tokenizer, meta=meta)
    model, meta = load_transformer(ref, kind, official_hparams, trust)
    return Prior(kind, model, str(ref), checkpoint_sha256(ref), model.cfg.codebook_size, model.cfg.block_size,
                 meta=meta)


def reference_files(ref: str, kind: str | None = None) -> list[Path]:
    """The files a reference reads, for `bench datasets` to say which are present."""
    if kind == "taming":
        from .taming import release_files
        return release_files(ref)
    if is_official(ref):
        return [Path(ref)]
    return [resolve(ref).with_suffix(s) for s in (".safetensors", ".json")]
