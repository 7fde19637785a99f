"""The networks: a VQ autoencoder of the official VQGAN's family and a GPT-style token transformer.

Module and parameter names follow the official Unleashing Transformers code (encoder.blocks.N,
quantize.embedding, generator.blocks.N; tok_emb, pos_emb, start_tok, blocks.N.attn.key, ln_f, head)
so that official state dicts map onto these modules key for key.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- VQ autoencoder

@dataclass
class VQConfig:
    img_size: int = 16
    n_channels: int = 1
    nf: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1])
    res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    codebook_size: int = 64
    emb_dim: int = 32
    beta: float = 0.25

    @property
    def latent_hw(self) -> int:
        return self.img_size // 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        return _dataclass_from_dict(cls, d)


def _dataclass_from_dict(cls, d: dict):
    """A config from a checkpoint's `hparams`, every value checked against its field's default type."""
    from .errors import BenchError
    if not isinstance(d, dict):
        raise BenchError(f"{cls.__name__} hyperparameters must be a JSON object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise BenchError(f"unknown {cls.__name__} hyperparameter(s) {unknown}; expected some of {sorted(known)}")
    for key, value in d.items():
        f = known[key]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
        else:  # lists of positive integers
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                 for v in value)
        if not ok:
            expected = {bool: "true or false", int: "a positive integer", float: "a finite number >= 0"}.get(
                type(default), "a list of positive integers")
            raise BenchError(f"{cls.__name__} hyperparameter {key} = {value!r}; expected {expected}")
    return cls(**d)


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        # The official block always owns this 1x1 conv (it is in every checkpoint) but only uses it
        # when the channel count changes.
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x_in):
        x = self.conv1(swish(self.norm1(x_in)))
        x = self.conv2(swish(self.norm2(x)))
        if self.in_channels != self.out_channels:
            x_in = self.conv_out(x_in)
        return x + x_in


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # (b, hw, c)
        k = self.k(h).reshape(b, c, hh * ww)                    # (b, c, hw)
        v = self.v(h).reshape(b, c, hh * ww)
        # the products in the order of the official code (and of Taming's, which it copies), so that
        # outputs agree to the last bits: Taming's tests need exactly that
        w = torch.bmm(q, k) * (int(c) ** -0.5)
        w = F.softmax(w, dim=2).permute(0, 2, 1)
        return x + self.proj_out(torch.bmm(v, w).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        res, ch = cfg.img_size, cfg.nf
        blocks: list[nn.Module] = [nn.Conv2d(cfg.n_channels, ch, 3, 1, 1)]
        for i, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(ch, cfg.nf * mult))
                ch = cfg.nf * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if i != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch), normalize(ch),
                   nn.Conv2d(ch, cfg.emb_dim, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Generator(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch = cfg.nf * cfg.ch_mult[-1]
        res = cfg.latent_hw
        blocks: list[nn.Module] = [nn.Conv2d(cfg.emb_dim, ch, 3, 1, 1),
                                   ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
        for i in reversed(range(len(cfg.ch_mult))):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(ch, cfg.nf * cfg.ch_mult[i]))
                ch = cfg.nf * cfg.ch_mult[i]
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if i != 0:
                blocks.append(Upsample(ch))
                res *= 2
        blocks += [normalize(ch), nn.Conv2d(ch, cfg.n_channels, 3, 1, 1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer with a commitment term (beta), as in the official VQGAN."""

    def __init__(self, codebook_size: int, emb_dim: int, beta: float):
        super().__init__()
        self.codebook_size, self.emb_dim, self.beta = codebook_size, emb_dim, beta
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        e = self.embedding.weight
        d = (z_flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z_flat @ e.t()
        return d.argmin(1)

    def forward(self, z: torch.Tensor):
        """z: (B, C, h, w) -> (quantized with straight-through gradient, loss, code indices (B, h, w))."""
        b, c, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.nearest(z_flat)
        z_q = self.embedding(codes).view(b, h, w, c).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, codes.view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> embeddings (B, C, h, w)."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQAutoEncoder(nn.Module):
    """Images in [0, 1], (B, C, H, W) <-> codes (B, h, w)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.emb_dim, cfg.beta)
        self.generator = Generator(cfg)

    def forward(self, x):
        z_q, codebook_loss, codes = self.quantize(self.encoder(x))
        return self.generator(z_q), codebook_loss, codes

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encoder(x))[2]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.generator(self.quantize.lookup(codes))


# ----------------------------------------------------------------------------- token transformer

@dataclass
class TransformerConfig:
    codebook_size: int = 64
    block_size: int = 64          # number of token positions
    n_layers: int = 4
    n_head: int = 4
    n_emb: int = 128
    causal: bool = False          # False: absorbing denoiser; True: autoregressive prior
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        return _dataclass_from_dict(cls, d)

    def forward_flops(self, new_tokens: int, context: int) -> float:
        """Matmul FLOPs of one forward pass over `new_tokens` positions attending to `context` keys."""
        d = self.n_emb
        per_token = self.n_layers * (2 * 4 * d * d + 2 * 8 * d * d + 2 * 2 * context * d) + 2 * d * self.codebook_size
        return float(new_tokens * per_token)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        assert cfg.n_emb % cfg.n_head == 0
        self.key = nn.Linear(cfg.n_emb, cfg.n_emb)
        self.query = nn.Linear(cfg.n_emb, cfg.n_emb)
        self.value = nn.Linear(cfg.n_emb, cfg.n_emb)
        self.proj = nn.Linear(cfg.n_emb, cfg.n_emb)
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        self.n_head, self.causal, self.attn_pdrop = cfg.n_head, cfg.causal, cfg.attn_pdrop

    def forward(self, x, cache: "KVCache | None" = None, layer: int = 0, pos: torch.Tensor | None = None):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        mask = None
        if pos is not None:  # static shapes: write at pos, attend to the whole cache, later keys masked
            k, v = cache.write_at(layer, pos, k, v)
            mask = (torch.arange(k.shape[2], device=k.device) <= pos).view(1, 1, 1, -1)
        elif cache is not None:
            k, v = cache.append(layer, k, v)
        # With a cache the new queries are the last positions, so they may see every cached key.
        causal = self.causal and cache is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_emb)
        self.ln2 = nn.LayerNorm(cfg.n_emb)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_emb, 4 * cfg.n_emb), nn.GELU(),
                                 nn.Linear(4 * cfg.n_emb, cfg.n_emb), nn.Dropout(cfg.resid_pdrop))

    def forward(self, x, cache=None, layer: int = 0, pos=None):
        x = x + self.attn(self.ln1(x), cache, layer, pos)
        return x + self.mlp(self.ln2(x))


class KVCache:
    """Keys and values of every layer, preallocated for the whole sequence."""

    def __init__(self, n_layers: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device, dtype):
        shape = (n_layers, batch, n_head, max_len, head_dim)
        # zeros, not empty: the static-shape step multiplies masked-out positions by a weight of 0,
        # and 0 * (NaN left in uninitialised memory) would be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self._pending = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, n = self.length, k.shape[2]
        self.k[layer, :, :, start:start + n] = k
        self.v[layer, :, :, start:start + n] = v
        self._pending = n
        return self.k[layer, :, :, :start + n], self.v[layer, :, :, :start + n]

    def advance(self):
        self.length += self._pending
        self._pending = 0

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """One new position given as a tensor (so a compiled step never sees a new shape): the
        whole cache of this layer, unfilled positions included (the caller masks them)."""
        self.k[layer].index_copy_(2, pos.view(1), k.to(self.k.dtype))
        self.v[layer].index_copy_(2, pos.view(1), v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


class Transformer(nn.Module):
    """GPT-style transformer over token grids flattened in raster order.

    Bidirectional (absorbing denoiser): input vocabulary codebook_size + 1, the last id is the mask.
    Causal (autoregressive prior): input vocabulary codebook_size, a learned start token is
    prepended, and logits at position i predict token i.
    The head always outputs codebook_size classes.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.codebook_size if cfg.causal else cfg.codebook_size + 1
        self.tok_emb = nn.Embedding(vocab, cfg.n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_emb))
        self.start_tok = nn.Parameter(torch.zeros(1, 1, cfg.n_emb))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.n_emb)
        self.head = nn.Linear(cfg.n_emb, cfg.codebook_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T', codebook_size).

        Causal without cache: T' = T + 1 (start token prepended). Causal with cache: idx holds
        only the new tokens (possibly none, on the first call) and positions continue from the cache.
        """
        return self.project(self.hidden(idx, cache))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: hidden states (..., n_emb) -> logits (..., codebook_size)."""
        return self.head(self.ln_f(hidden))

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The trunk: token ids (B, T) -> hidden states (B, T', n_emb) before the final norm."""
        x = self.tok_emb(idx)
        start = 0
        if self.cfg.causal:
            if cache is None or cache.length == 0:
                x = torch.cat((self.start_tok.expand(x.shape[0], 1, -1), x), dim=1)
            else:
                start = cache.length
        T = x.shape[1]
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.drop(x + self.pos_emb[:, start:start + T])
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance()
        return x

    def hidden_at(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Causal prior, one step with static shapes: the token ids (B, 1) that sit at position
        `pos` (a one-element tensor, >= 1: position 0 is the start token, fed by hidden(.., cache))
        -> hidden states (B, 1, n_emb). Same result as hidden(idx, cache) up to float rounding."""
        x = self.tok_emb(idx) + self.pos_emb[:, pos.view(1)]
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, pos)
        return x

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.cfg
        p = self.head.weight
        return KVCache(c.n_layers, batch, c.n_head, c.block_size, c.n_emb // c.n_head, p.device, dtype or p.dtype)


def config_dict(cfg) -> dict:
    return asdict(cfg)
