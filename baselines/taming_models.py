"""The networks of a Taming Transformers release (github.com/CompVis/taming-transformers), reimplemented.

- TamingFirstStage: the VQGAN `taming.models.vqgan.VQModel`: Encoder and Decoder of
  taming.modules.diffusionmodules.model, quant_conv / post_quant_conv, and the quantizer
  `VectorQuantizer2` (nearest codebook entry; remap=None only).
- TamingGPT: `taming.modules.transformer.mingpt.GPT`, with a key/value cache for sampling.

Module and parameter names are Taming's, so the `first_stage_model.*` and `transformer.*` parts of
a release's state dict load key for key once the prefix is stripped (bench.loading.taming).
Numerics follow Taming's code: GroupNorm(32 groups, eps 1e-6), swish, zero padding on the right
and bottom before each stride-2 convolution, nearest-neighbour upsampling, single-head spatial
attention scaled by channels ** -0.5; in the GPT, LayerNorm (eps 1e-5), exact GELU, attention
written out as softmax(q k^T / sqrt(d), masked by the stored causal mask) v.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# The official UT VQGAN copies Taming's blocks, so the attention block and normalisation are bench's.
# KVCache: Taming grows its cache by concatenation each token; the attention sees the same keys and
# values in bench's preallocated one.
from bench.models import AttnBlock, KVCache, normalize, swish


# ----------------------------------------------------------------------------- first stage

@dataclass
class TamingFirstStageConfig:
    """`ddconfig` of the release's first stage, plus VQModel's embed_dim and n_embed."""
    resolution: int
    z_channels: int
    embed_dim: int
    n_embed: int
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    in_channels: int = 3
    out_ch: int = 3
    resamp_with_conv: bool = True
    beta: float = 0.25        # VQModel always passes 0.25
    legacy: bool = True       # VectorQuantizer2's default: beta weighs the codebook term (a kept bug)

    @property
    def latent_hw(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def as_dict(self) -> dict:
        return asdict(self)


class ResnetBlock(nn.Module):
    """Taming's ResnetBlock as its Encoder and Decoder build it: no time embedding, a 1x1
    `nin_shortcut` where the channel count changes. Dropout is a no-op at sampling time."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Level(nn.Module):
    """One resolution of the encoder (down.N) or decoder (up.N): blocks, their attention, resampling."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return getattr(self, self.resample_name)(h) if self.resample_name else h


class Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) in [-1, 1] -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: TamingFirstStageConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        res, block_in = cfg.resolution, cfg.ch
        in_mult = [1] + list(cfg.ch_mult)
        levels = []
        for i in range(n):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = Downsample(block_in, cfg.resamp_with_conv) if i != n - 1 else None
            levels.append(Level(blocks, attn, down, "downsample"))
            if down is not None:
                res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = Middle(block_in)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> images (B, out_ch, h*f, w*f), about [-1, 1]."""

    def __init__(self, cfg: TamingFirstStageConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.latent_hw
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = Middle(block_in)
        levels: list[nn.Module] = [None] * n  # up[i] is level i; built from the lowest resolution up
        for i in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = Upsample(block_in, cfg.resamp_with_conv) if i != 0 else None
            levels[i] = Level(blocks, attn, up, "upsample")
            if up is not None:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer2(nn.Module):
    """Nearest codebook entry by squared distance; indices and codebook lookups."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor):
        """z (B, C, h, w) -> (z_q (B, C, h, w) with straight-through gradient, loss, indices (B, h, w))."""
        b, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.embed_dim)
        e = self.embedding.weight
        # Taming's expression term for term (einsum included), so that near-ties resolve alike
        d = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", flat, e.t()))
        idx = torch.argmin(d, dim=1)
        z_q = self.embedding(idx).view(z.shape)
        commit, codebook = torch.mean((z_q.detach() - z) ** 2), torch.mean((z_q - z.detach()) ** 2)
        # legacy (the released models): beta multiplies the codebook term instead of the commitment term
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, idx.view(b, h, w)

    def lookup(self, indices: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """get_codebook_entry: flat indices and shape (B, h, w, C) -> (B, C, h, w)."""
        return self.embedding(indices.reshape(-1)).view(shape).permute(0, 3, 1, 2).contiguous()


class TamingFirstStage(nn.Module):
    """VQModel: images in [-1, 1] (B, C, H, W) <-> code indices (B, h, w)."""

    def __init__(self, cfg: TamingFirstStageConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer2(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.quant_conv(self.encoder(x)))[2]

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) or (B, h*w) in raster order -> images (B, out_ch, H, W), about [-1, 1]."""
        hw = self.cfg.latent_hw
        z_q = self.quantize.lookup(indices, (len(indices), hw, hw, self.cfg.embed_dim))
        return self.decoder(self.post_quant_conv(z_q))


# ----------------------------------------------------------------------------- transformer

@dataclass
class TamingGPTConfig:
    """mingpt.GPT's arguments (its defaults where the release's yaml leaves one out), and the
    start-of-sequence token of the unconditional Net2NetTransformer."""
    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0
    sos_token: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def forward_flops(self, new_tokens: int, context: int, head_tokens: int | None = None) -> float:
        """Matmul FLOPs of one pass over `new_tokens` positions attending to `context` keys, the output
        head applied at `head_tokens` positions (default: all of them)."""
        d = self.n_embd
        per_token = self.n_layer * (2 * 4 * d * d + 2 * 8 * d * d + 2 * 2 * context * d)
        head = 2 * d * self.vocab_size * (new_tokens if head_tokens is None else head_tokens)
        return float(new_tokens * per_token + head)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TamingGPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_drop = nn.Dropout(cfg.attn_pdrop)
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        if cfg.n_unmasked:
            mask[:cfg.n_unmasked, :cfg.n_unmasked] = 1
        # part of every Taming state dict; loaded from the release like the weights
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size))
        self.n_head = cfg.n_head

    def forward(self, x, cache: "KVCache | None" = None, layer: int = 0):
        """x (B, T, C): positions cache.length .. cache.length+T-1 (0.. without a cache)."""
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        k, q, v = split(self.key(x)), split(self.query(x)), split(self.value(x))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.append(layer, k, v)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        # rows start..start+T-1 of the causal mask; with one new token and a cache the row is all
        # ones up to it, which is what Taming's cached pass (no mask) computes
        att = att.masked_fill(self.mask[:, :, start:start + T, :start + T] == 0, float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: TamingGPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.resid_pdrop))

    def forward(self, x, cache=None, layer: int = 0):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class TamingGPT(nn.Module):
    """Causal transformer over code indices; the first input of an unconditional release is
    cfg.sos_token, an ordinary code, and logits at position i predict code i of the image."""

    def __init__(self, cfg: TamingGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) at positions cache.length.. (0.. without a cache) -> states before ln_f."""
        start = cache.length if cache is not None else 0
        T = idx.shape[1]
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + T, :])
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance()
        return x

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(hidden))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab_size)."""
        return self.project(self.hidden(idx, cache))

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        c, p = self.cfg, self.head.weight
        return KVCache(c.n_layer, batch, c.n_head, c.block_size, c.n_embd // c.n_head, p.device,
                             dtype or p.dtype)
