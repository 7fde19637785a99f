"""Taming Transformers releases (github.com/CompVis/taming-transformers) as a tokenizer and a prior.

A release is the log folder Taming's training writes and its README links to, for example
`2021-04-23T18-19-01_ffhq_transformer/`:

    checkpoints/last.ckpt            a PyTorch Lightning checkpoint: {"state_dict": ..., "epoch",
                                     "global_step", "callbacks": {ModelCheckpoint: {...}},
                                     "optimizer_states", "lr_schedulers", ...}
    configs/<timestamp>-project.yaml the model config (model.target, model.params)

    tokenizer, gpt, meta = load_taming("logs/2021-04-23T18-19-01_ffhq_transformer")

Only unconditional Net2NetTransformers are read (cond_stage_config: __is_unconditional__): their
first stage is a VQModel (VectorQuantizer2) and their transformer a mingpt.GPT whose first input
is the start-of-sequence token `sos_token` (default 0), an ordinary code. The checkpoint is read by
bench.loading.pickles (nothing in it is run; Lightning need not be installed) and only its
`state_dict` is read into memory.

The yaml is read with PyYAML's safe_load, not OmegaConf: the project yaml is plain YAML written by
OmegaConf.save, safe_load builds only plain values, and bench needs no OmegaConf machinery (a value
with an OmegaConf interpolation `${...}` is refused).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import yaml

from baselines.taming_models import TamingFirstStage, TamingFirstStageConfig, TamingGPT, TamingGPTConfig

from ..checkpoints import file_sha256, load_checkpoint, load_state_strict, save_checkpoint, state_mismatches
from ..errors import BenchError
from . import Tokenizer
from .pickles import TensorRef, open_torch_file

SOURCE = "taming-release"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
VQMODEL = "taming.models.vqgan.VQModel"
GPT = "taming.modules.transformer.mingpt.GPT"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"

# the keyword arguments each of Taming's classes takes (more is a TypeError in Taming itself)
NET2NET_PARAMS = {"transformer_config", "first_stage_config", "cond_stage_config", "permuter_config", "ckpt_path",
                  "ignore_keys", "first_stage_key", "cond_stage_key", "downsample_cond_size", "pkeep", "sos_token",
                  "unconditional"}
VQMODEL_PARAMS = {"ddconfig", "lossconfig", "n_embed", "embed_dim", "ckpt_path", "ignore_keys", "image_key",
                  "colorize_nlabels", "monitor", "remap", "sane_index_shape"}
GPT_PARAMS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "embd_pdrop", "resid_pdrop", "attn_pdrop",
              "n_unmasked"}
# ddconfig keys bench uses; Taming's Encoder and Decoder ignore any others, and so does bench
DDCONFIG_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")


def is_taming_release(path) -> bool:
    """A folder laid out as a Taming log folder (checkpoints/last.ckpt or configs/*-project.yaml)."""
    p = Path(path)
    return p.is_dir() and ((p / CHECKPOINT).exists() or any((p / "configs").glob("*-project.yaml")))


def release_files(path) -> list[Path]:
    """The files a release reference reads, for `bench datasets` to say which are present."""
    p = Path(path)
    configs = sorted((p / "configs").glob("*-project.yaml")) or [p / "configs" / "<timestamp>-project.yaml"]
    return [p / CHECKPOINT, *configs]


# ----------------------------------------------------------------------------- the yaml

def project_yaml(release: Path) -> Path:
    found = sorted((release / "configs").glob("*-project.yaml"))
    if not found:
        raise BenchError(f"Taming release {release}: no configs/<timestamp>-project.yaml; expected the log folder "
                         f"as Taming publishes it (checkpoints/last.ckpt and configs/<timestamp>-project.yaml)")
    if len(found) > 1:
        raise BenchError(f"Taming release {release}: several project yamls ({', '.join(f.name for f in found)}); "
                         f"Taming's sample_fast.py would merge them in name order, bench reads one: keep the one "
                         f"that goes with checkpoints/last.ckpt")
    return found[0]


class _Yaml:
    """Typed access to the project yaml; every error names the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.root = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise BenchError(f"Taming config {path} is not readable YAML ({str(e).splitlines()[0]})") from None
        self._no_interpolation(self.root, "")

    def _no_interpolation(self, node, key):
        if isinstance(node, str) and "${" in node:
            raise BenchError(f"Taming config {self.path}: {key} = {node!r} is an OmegaConf interpolation, which "
                             f"bench does not resolve; write the value itself")
        if isinstance(node, dict):
            for k, v in node.items():
                self._no_interpolation(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self._no_interpolation(v, f"{key}[{i}]")

    def error(self, key: str, message: str) -> BenchError:
        return BenchError(f"Taming config {self.path}: {key} {message}")

    def get(self, node, key: str, kind, default=..., where: str = ""):
        full = f"{where}.{key}" if where else key
        if not isinstance(node, dict) or key not in node or node[key] is None and default is not ...:
            if default is ...:
                raise self.error(full, "is missing")
            return default
        value = node[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(full, f"= {value!r}; expected an integer")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(full, f"= {value!r}; expected a number")
            value = float(value)
        if kind is bool and not isinstance(value, bool):
            raise self.error(full, f"= {value!r}; expected true or false")
        if kind == "ints":
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise self.error(full, f"= {value!r}; expected a list of integers")
        if kind is dict and not isinstance(value, dict):
            raise self.error(full, f"= {value!r}; expected a mapping")
        return value

    def params(self, node, where: str, target: str, allowed: set[str]) -> dict:
        found = self.get(node, "target", str, where=where)
        if found != target:
            raise self.error(f"{where}.target", f"= {found!r}; bench reads {target} only")
        params = self.get(node, "params", dict, {}, where)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise self.error(f"{where}.params", f"has {unknown}, which Taming's {target.rsplit('.', 1)[1]} does not take")
        return params


def read_taming_config(path) -> dict:
    """The hyperparameters of a project yaml: {"first_stage": TamingFirstStageConfig fields,
    "transformer": TamingGPTConfig fields}, checked as Taming would build the model, and for what
    unconditional sampling needs."""
    y = _Yaml(Path(path))
    model = y.get(y.root, "model", dict)
    p = y.params(model, "model", NET2NET, NET2NET_PARAMS)
    where = "model.params"

    cond = p.get("cond_stage_config")
    unconditional = y.get(p, "unconditional", bool, False, where)
    if cond is None and not unconditional:
        raise y.error(f"{where}.cond_stage_config", "is missing (an unconditional release has "
                                                    "cond_stage_config: __is_unconditional__)")
    if cond == "__is_first_stage__" or not (cond == "__is_unconditional__" or unconditional):
        what = cond.get("target", cond) if isinstance(cond, dict) else cond
        raise y.error(f"{where}.cond_stage_config", f"= {what!r}: a conditional model; bench samples unconditional "
                                                     f"releases only (cond_stage_config: __is_unconditional__)")
    permuter = p.get("permuter_config")
    if permuter is not None and (not isinstance(permuter, dict) or permuter.get("target") != IDENTITY_PERMUTER
                                 or permuter.get("params")):
        raise y.error(f"{where}.permuter_config", f"= {permuter!r}; bench reads raster order only ({IDENTITY_PERMUTER})")
    sos = y.get(p, "sos_token", int, 0, where)

    fs_where = f"{where}.first_stage_config"
    fs = y.params(y.get(p, "first_stage_config", dict, where=where), fs_where, VQMODEL, VQMODEL_PARAMS)
    fs_where += ".params"
    if fs.get("remap") is not None:
        raise y.error(f"{fs_where}.remap", f"= {fs['remap']!r}; codebook remapping is not supported (remap: null only)")
    dd_where = f"{fs_where}.ddconfig"
    dd = y.get(fs, "ddconfig", dict, where=fs_where)
    for key in DDCONFIG_REQUIRED:
        y.get(dd, key, "ints" if key == "attn_resolutions" else int, where=dd_where)
    if y.get(dd, "double_z", bool, True, dd_where):
        raise y.error(f"{dd_where}.double_z", "is true (Taming's default): the encoder then gives 2 x z_channels, "
                                              "which VQModel's quant_conv cannot take; releases set double_z: false")
    if y.get(dd, "give_pre_end", bool, False, dd_where):
        raise y.error(f"{dd_where}.give_pre_end", "is true: the decoder would not output images")
    first = TamingFirstStageConfig(
        resolution=dd["resolution"], z_channels=dd["z_channels"],
        embed_dim=y.get(fs, "embed_dim", int, where=fs_where), n_embed=y.get(fs, "n_embed", int, where=fs_where),
        ch=dd["ch"], ch_mult=list(y.get(dd, "ch_mult", "ints", [1, 2, 4, 8], dd_where)),
        num_res_blocks=dd["num_res_blocks"], attn_resolutions=list(dd["attn_resolutions"]),
        in_channels=dd["in_channels"], out_ch=dd["out_ch"],
        resamp_with_conv=y.get(dd, "resamp_with_conv", bool, True, dd_where))
    if not first.ch_mult or first.resolution % 2 ** (len(first.ch_mult) - 1):
        raise y.error(f"{dd_where}.resolution", f"= {first.resolution} does not halve {len(first.ch_mult) - 1} times "
                                                f"(ch_mult {first.ch_mult})")
    odd = [first.ch * m for m in [1] + first.ch_mult if (first.ch * m) % 32]
    if odd:
        raise y.error(f"{dd_where}.ch", f"= {first.ch} with ch_mult {first.ch_mult} gives {odd[0]} channels; "
                                        f"Taming's GroupNorm needs multiples of 32")
    if first.in_channels != first.out_ch:
        raise y.error(f"{dd_where}.out_ch", f"= {first.out_ch} but in_channels = {first.in_channels}; a tokenizer "
                                            f"must decode the images it encodes")

    tr_where = f"{where}.transformer_config"
    tr = y.params(y.get(p, "transformer_config", dict, where=where), tr_where, GPT, GPT_PARAMS)
    tr_where += ".params"
    gpt = TamingGPTConfig(
        vocab_size=y.get(tr, "vocab_size", int, where=tr_where), block_size=y.get(tr, "block_size", int, where=tr_where),
        n_layer=y.get(tr, "n_layer", int, 12, tr_where), n_head=y.get(tr, "n_head", int, 8, tr_where),
        n_embd=y.get(tr, "n_embd", int, 256, tr_where), embd_pdrop=y.get(tr, "embd_pdrop", float, 0.0, tr_where),
        resid_pdrop=y.get(tr, "resid_pdrop", float, 0.0, tr_where),
        attn_pdrop=y.get(tr, "attn_pdrop", float, 0.0, tr_where),
        n_unmasked=y.get(tr, "n_unmasked", int, 0, tr_where), sos_token=sos)
    if gpt.n_head < 1 or gpt.n_embd % gpt.n_head:
        raise y.error(f"{tr_where}.n_embd", f"= {gpt.n_embd} is not divisible by n_head = {gpt.n_head}")
    if gpt.n_unmasked:
        raise y.error(f"{tr_where}.n_unmasked", f"= {gpt.n_unmasked}; an unconditional release has a causal mask "
                                                f"throughout (n_unmasked: 0)")
    if gpt.vocab_size != first.n_embed:
        raise y.error(f"{tr_where}.vocab_size", f"= {gpt.vocab_size} but the first stage has n_embed = "
                                                f"{first.n_embed} codes; an unconditional model predicts those codes")
    if not 0 <= sos < gpt.vocab_size:
        raise y.error(f"{where}.sos_token", f"= {sos} is not a token of the vocabulary (0..{gpt.vocab_size - 1})")
    L = first.latent_hw ** 2
    if gpt.block_size < L:
        raise y.error(f"{tr_where}.block_size", f"= {gpt.block_size} is shorter than the start token plus "
                                                f"{L - 1} codes of a {first.latent_hw}x{first.latent_hw} grid ({L})")
    return {"first_stage": first.as_dict(), "transformer": gpt.as_dict()}


# ----------------------------------------------------------------------------- the checkpoint

def _dropped(key: str) -> bool:
    """Keys of a Net2NetTransformer's state dict that sampling never uses: the first stage's
    training loss (LPIPS, discriminator) and its optional `colorize` buffer."""
    return key.startswith("first_stage_model.loss.") or key == "first_stage_model.colorize"


def _check_shapes(module: torch.nn.Module, refs: Mapping, prefix: str, ckpt: Path, config: Path) -> None:
    parts = state_mismatches(module.state_dict(), refs, prefix)
    if parts:
        raise BenchError(f"Taming checkpoint {ckpt} does not fit {config}: " + "; ".join(parts))


def read_taming_release(path) -> tuple[dict, dict, dict, dict]:
    """-> (first_stage_state, transformer_state, hparams, meta): the two state dicts with Taming's
    `first_stage_model.` and `transformer.` prefixes stripped, as float32 tensors."""
    release = Path(path)
    if not release.is_dir():
        raise BenchError(f"Taming release {release} is not a folder; expected the log folder as Taming publishes "
                         f"it (checkpoints/last.ckpt and configs/<timestamp>-project.yaml)")
    config = project_yaml(release)
    ckpt = release / CHECKPOINT
    if not ckpt.is_file():
        raise BenchError(f"Taming release {release}: {CHECKPOINT} not found; download the whole release folder")
    hparams = read_taming_config(config)
    with open_torch_file(ckpt) as f:
        top = f.root
        if not isinstance(top, Mapping) or not isinstance(top.get("state_dict"), Mapping):
            keys = list(top)[:5] if isinstance(top, Mapping) else type(top).__name__
            raise BenchError(f"Taming checkpoint {ckpt} has no `state_dict` (found {keys}); expected a "
                             f"PyTorch Lightning checkpoint as Taming's training saves it")
        state = top["state_dict"]
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, TensorRef)]
        if bad:
            raise BenchError(f"Taming checkpoint {ckpt}: state_dict entry {bad[0]!r} is not a tensor")
        parts: dict[str, dict] = {"first_stage_model.": {}, "transformer.": {}}
        stray = []
        for key, ref in state.items():
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is None:
                stray.append(key)
            elif not _dropped(key):
                parts[prefix][key[len(prefix):]] = ref
        if stray:
            raise BenchError(f"Taming checkpoint {ckpt}: keys outside first_stage_model and transformer "
                             f"({stray[:3]}); an unconditional Net2NetTransformer has no others (a conditional "
                             f"model has cond_stage_model.*)")
        _check_shapes(TamingFirstStage(TamingFirstStageConfig(**hparams["first_stage"])),
                      parts["first_stage_model."], "first_stage_model.", ckpt, config)
        _check_shapes(TamingGPT(TamingGPTConfig(**hparams["transformer"])),
                      parts["transformer."], "transformer.", ckpt, config)
        first_state = {k: t.float() for k, t in f.materialize(parts["first_stage_model."]).items()}
        gpt_state = {k: t.float() for k, t in f.materialize(parts["transformer."]).items()}
        lightning = {k: top[k] for k in ("epoch", "global_step", "pytorch-lightning_version")
                     if isinstance(top.get(k), (int, str))}
    meta = {"kind": "taming", "hparams": hparams,
            "source": {"format": SOURCE, "release": release.name, "checkpoint": str(CHECKPOINT),
                       "config": f"configs/{config.name}", "sha256": file_sha256(ckpt),
                       "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(), **lightning}}
    return first_state, gpt_state, hparams, meta


# ----------------------------------------------------------------------------- tokenizer and prior

def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1], as Taming's data pipeline makes them
    (image / 127.5 - 1 in float64, then float32)."""
    x = (np.asarray(images, dtype=np.uint8) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) -> uint8 (B, H, W, C) as Taming's sample_fast.py writes its PNGs:
    255 * (x + 1) / 2 in float32, clipped to [0, 255], then truncated (not rounded)."""
    a = x.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    return (255 * ((a + 1.0) / 2.0)).clip(0, 255).astype(np.uint8)


class TamingTokenizer(Tokenizer):
    """A release's own first stage as a tokenizer: 8-bit images <-> codes in raster order."""

    def __init__(self, model: TamingFirstStage, name: str, sha256: str, meta: dict | None = None):
        self.model, self.name, self.sha256, self.meta = model.eval(), name, sha256, meta or {}
        c = model.cfg
        self.codebook_size, self.latent_hw, self.img_size, self.channels = c.n_embed, c.latent_hw, c.resolution, c.out_ch

    @property
    def device(self) -> torch.device:
        return self.model.quant_conv.weight.device

    def to(self, device) -> "TamingTokenizer":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.img_size, self.img_size, self.channels):
            raise BenchError(f"tokenizer {self.name} encodes {self.img_size}x{self.img_size}x{self.channels} images, "
                             f"got an array of shape {images.shape}")
        codes = self.model.encode(to_float_images(images).to(self.device))
        return codes.reshape(len(images), -1)

    @torch.no_grad()
    def decode_float(self, tokens) -> torch.Tensor:
        """int64 (B, L) -> float images (B, C, H, W) as Taming's decode_to_img returns them."""
        tokens = torch.as_tensor(tokens, device=self.device, dtype=torch.long)
        L = self.latent_hw ** 2
        if tokens.ndim != 2 or tokens.shape[1] != L:
            raise BenchError(f"tokenizer {self.name} decodes (batch, {L}) token grids, got shape {tuple(tokens.shape)}")
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise BenchError(f"tokenizer {self.name}: tokens outside 0..{self.codebook_size - 1}")
        return self.model.decode(tokens)

    def decode(self, tokens) -> np.ndarray:
        return to_uint8_images(self.decode_float(tokens))


def _models(first_state: dict, gpt_state: dict, hparams: dict, source: str) -> tuple[TamingFirstStage, TamingGPT]:
    first = TamingFirstStage(TamingFirstStageConfig(**hparams["first_stage"]))
    load_state_strict(first, first_state, f"{source} (first_stage_model.*)")
    gpt = TamingGPT(TamingGPTConfig(**hparams["transformer"]))
    load_state_strict(gpt, gpt_state, f"{source} (transformer.*)")
    return first.eval(), gpt.eval()


def load_taming(path) -> tuple[TamingTokenizer, TamingGPT, dict]:
    """A release folder -> (its first stage as a tokenizer, its GPT in eval mode, meta)."""
    first_state, gpt_state, hparams, meta = read_taming_release(path)
    first, gpt = _models(first_state, gpt_state, hparams, str(Path(path) / CHECKPOINT))
    tokenizer = TamingTokenizer(first, f"taming:{Path(path).name}", meta["source"]["sha256"], meta)
    return tokenizer, gpt, meta


# ----------------------------------------------------------------------------- conversion

def convert_taming(path, out_dir) -> dict[str, Path]:
    """A release -> harness checkpoints <out_dir>/taming_first_stage and <out_dir>/taming_transformer
    (safetensors + JSON with the hyperparameters and the release's provenance)."""
    first_state, gpt_state, hparams, meta = read_taming_release(path)
    _models(first_state, gpt_state, hparams, str(Path(path) / CHECKPOINT))  # check before writing anything
    out = Path(out_dir)
    written = {}
    for part, state in (("first_stage", first_state), ("transformer", gpt_state)):
        written[part] = save_checkpoint(out / f"taming_{part}", state,
                                        {"kind": f"taming-{part.replace('_', '-')}", "hparams": hparams[part],
                                         "source": meta["source"]})
    return written


def load_converted_taming(out_dir) -> tuple[TamingTokenizer, TamingGPT, dict]:
    """What convert_taming wrote -> (tokenizer, GPT, meta), as load_taming gives them."""
    out = Path(out_dir)
    first_state, first_meta = load_checkpoint(out / "taming_first_stage", kind="taming-first-stage")
    gpt_state, gpt_meta = load_checkpoint(out / "taming_transformer", kind="taming-transformer")
    hparams = {"first_stage": first_meta["hparams"], "transformer": gpt_meta["hparams"]}
    first, gpt = _models(first_state, gpt_state, hparams, str(out))
    meta = {"kind": "taming", "hparams": hparams, "source": first_meta["source"]}
    name = f"taming:{first_meta['source'].get('release', out.name)}"
    return TamingTokenizer(first, name, first_meta["source"]["sha256"], meta), gpt, meta
