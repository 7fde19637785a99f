"""The official Unleashing Transformers checkpoints (github.com/samb-t/unleashing-transformers) in bench.

    flags = resolve_hparams("churches")               # a preset, or a dict of official flag names
    vq, meta = load_official_vq("vqgan_ema_2200000.th", flags)
    prior, meta = load_official_transformer("absorbing_ema_2000000.th", "absorbing", flags)
    convert_official("vqgan_ema_2200000.th", "absorbing_ema_2000000.th", hparams="churches", out_dir="ckpt")

The official training scripts save plain state dicts with torch.save:
  vqgan_ema_<step>.th           the whole VQGAN wrapper: ae.encoder.*, ae.quantize.*, ae.generator.*
                                (with the ELBO head ae.generator.logsigma.*), disc.* (discriminator) and
                                perceptual.* (the LPIPS network);
  absorbing_ema_<step>.th       the AbsorbingDiffusion sampler: _denoise_fn.* and the training buffers
                                Lt_history, Lt_count, loss_history;
  autoregressive_ema_<step>.th  the AutoregressiveTransformer: net.*, with a causal-mask buffer
                                net.blocks.N.attn.mask in every layer.
bench.models uses the official parameter names, so loading strips the prefix and drops what
sampling never uses (disc, perceptual, logsigma, the training buffers and the masks, which bench
rebuilds). Everything else must match the hyperparameters exactly.

Only tensors are read: torch.load(weights_only=True). A file whose pickle needs code (any class
besides tensors and containers) is refused unless the caller passes trust=True (--trust-checkpoint),
because loading it runs code from the file.

The files carry no hyperparameters; they come from the caller under the official flag names
(hparams/defaults/vqgan_defaults.py and sampler_defaults.py): a preset of PRESETS, or a dict
of flags. A dict with `dataset` set to a preset name starts from that preset, as the official
`--dataset churches --bert_n_layers 12` does.
"""
from __future__ import annotations

import copy
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints import check_writable, file_sha256, load_state_strict, save_checkpoint
from ..errors import BenchError
from ..models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig

SOURCE = "official-ut"
KINDS = ("vq", "absorbing", "autoregressive")
OFFICIAL_FILE = {"vq": "vqgan_ema_<step>.th", "absorbing": "absorbing_ema_<step>.th",
                 "autoregressive": "autoregressive_ema_<step>.th"}
PREFIX = {"vq": "ae.", "absorbing": "_denoise_fn.", "autoregressive": "net."}

# ----------------------------------------------------------------------------- hyperparameters

# The official defaults of hparams/defaults/vqgan_defaults.py (HparamsVQGAN) and sampler_defaults.py
# (HparamsAbsorbing, HparamsAutoregressive) for the three datasets of the paper: the same networks
# for all three (only training settings such as lr differ, and those are not kept here).
_VQGAN_256 = {
    "img_size": 256, "n_channels": 3, "nf": 128, "ch_mult": [1, 1, 2, 2, 4], "res_blocks": 2,
    "attn_resolutions": [16], "emb_dim": 256, "codebook_size": 1024, "latent_shape": [1, 16, 16],
    "beta": 0.25, "quantizer": "nearest", "ndf": 64, "disc_layers": 3,
}
_SAMPLER = {
    "bert_n_emb": 512, "bert_n_head": 8, "bert_n_layers": 24, "block_size": 256,
    "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
    "total_steps": 256, "sample_steps": 256, "loss_type": "reweighted_elbo", "mask_schedule": "random",
    "sample_type": "diffusion", "temp": 1.0,
}
PRESETS: dict[str, dict] = {name: {**_VQGAN_256, **_SAMPLER} for name in ("churches", "bedrooms", "ffhq")}

# flag -> (type, bench field); type: int, float, str or "ints"
VQ_FLAGS = {
    "img_size": (int, "img_size"), "n_channels": (int, "n_channels"), "nf": (int, "nf"),
    "ch_mult": ("ints", "ch_mult"), "res_blocks": (int, "res_blocks"),
    "attn_resolutions": ("ints", "attn_resolutions"), "emb_dim": (int, "emb_dim"),
    "codebook_size": (int, "codebook_size"), "beta": (float, "beta"),
}
TRANSFORMER_FLAGS = {
    "codebook_size": (int, "codebook_size"), "block_size": (int, "block_size"),
    "bert_n_layers": (int, "n_layers"), "bert_n_head": (int, "n_head"), "bert_n_emb": (int, "n_emb"),
    "embd_pdrop": (float, "embd_pdrop"), "resid_pdrop": (float, "resid_pdrop"), "attn_pdrop": (float, "attn_pdrop"),
}
CHECKED_FLAGS = {"latent_shape": "ints", "quantizer": str, "dataset": str}
OPTIONAL = {"beta": 0.25, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0}  # the official defaults
# Official flags that do not change the networks bench loads (training, logging, sampling scripts,
# and values the official scripts derive); accepted, so that a logged hparams dump can be passed as is.
IGNORED_FLAGS = frozenset("""
    amp ae_load_dir ae_load_step base_lr batch_size custom_dataset_path deepspeed diff_aug disc_layers
    disc_start_step disc_weight_max ema ema_beta fake_feats fake_images_path greedy greedy_epochs
    gumbel_kl_weight gumbel_straight_through horizontal_flip latents_path load_dir load_optim load_step
    log_dir loss_type lr mask_schedule model n_samples ndf perceptual_weight real_feats sample_block_size
    sample_steps sample_type sampler save_individually shape steps_per_checkpoint steps_per_display_output
    steps_per_eval steps_per_log steps_per_save_output steps_per_update_ema temp total_steps train_steps
    visdom_port visdom_server vqgan_batch_size warmup_iters
""".split())
FLAG_TYPES = {**{k: t for k, (t, _) in VQ_FLAGS.items()}, **{k: t for k, (t, _) in TRANSFORMER_FLAGS.items()},
              **CHECKED_FLAGS}


def _type_ok(value, t) -> bool:
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    return isinstance(value, list) and all(_type_ok(v, int) for v in value)


def check_hparams(spec) -> None:
    """Names and types only (what bench.toml's validation needs): a preset name, or a table of
    official flags. BenchError names the unknown preset or flag."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise BenchError(f"unknown official preset {spec!r}; presets: {', '.join(PRESETS)} "
                             f"(or give a table of official flags)")
        return
    if not isinstance(spec, Mapping):
        raise BenchError(f"official hyperparameters must be a preset name ({', '.join(PRESETS)}) or a table of "
                         f"official flags, got {spec!r}")
    unknown = sorted(k for k in spec if k not in FLAG_TYPES and k not in IGNORED_FLAGS)
    if unknown:
        raise BenchError(f"unknown official flag(s) {', '.join(map(repr, unknown))}; the flags that shape the "
                         f"networks are: {', '.join(sorted(FLAG_TYPES))}")
    for k, t in FLAG_TYPES.items():
        if k in spec and not _type_ok(spec[k], t):
            what = {int: "an integer", float: "a number", str: "a string"}.get(t, "a list of integers")
            raise BenchError(f"official flag {k!r} must be {what}, got {spec[k]!r}")


def resolve_hparams(spec) -> dict:
    """A preset name or a dict of official flags -> the dict of official flags (a copy)."""
    check_hparams(spec)
    if isinstance(spec, str):
        return copy.deepcopy(PRESETS[spec])
    base = PRESETS.get(spec.get("dataset"), {})
    return copy.deepcopy({**base, **spec})


def _pick(flags: dict, table: dict, what: str) -> dict:
    missing = [k for k in table if k not in flags and k not in OPTIONAL]
    if missing:
        raise BenchError(f"official hyperparameters for the {what} lack {', '.join(missing)}; give them, or "
                         f"start from a preset with dataset = one of {', '.join(PRESETS)}")
    return {field: flags.get(k, OPTIONAL.get(k)) for k, (_, field) in table.items()}


def _checked(config_cls, cfg):
    """Sizes in range (positive counts, probabilities >= 0), as a harness checkpoint's are checked."""
    try:
        return config_cls.from_dict(asdict(cfg))
    except BenchError as e:
        raise BenchError(f"official hyperparameters: {e}") from None


def _network(network_cls, cfg, path):
    try:
        return network_cls(cfg)
    except (AssertionError, ValueError, RuntimeError, ZeroDivisionError, IndexError) as e:
        raise BenchError(f"official hyperparameters for {path} do not make a {network_cls.__name__} "
                         f"({type(e).__name__}: {e or 'inconsistent sizes'})") from None


def vq_config(spec) -> VQConfig:
    """The VQ autoencoder's config from official flags (or a preset name)."""
    flags = resolve_hparams(spec)
    if flags.get("quantizer", "nearest") != "nearest":
        raise BenchError(f"official quantizer {flags['quantizer']!r} is not supported; bench loads the "
                         f"'nearest' (VQGAN) quantizer only")
    cfg = _checked(VQConfig, VQConfig(**_pick(flags, VQ_FLAGS, "VQGAN")))
    cfg.beta = float(cfg.beta)
    if not cfg.ch_mult or cfg.img_size % 2 ** (len(cfg.ch_mult) - 1):
        raise BenchError(f"official img_size {cfg.img_size} does not halve {len(cfg.ch_mult) - 1} times "
                         f"(ch_mult {cfg.ch_mult})")
    odd = [cfg.nf * m for m in cfg.ch_mult if (cfg.nf * m) % 32]
    if odd:
        raise BenchError(f"official nf {cfg.nf} x ch_mult {cfg.ch_mult} gives {odd[0]} channels; the official "
                         f"VQGAN's GroupNorm needs multiples of 32")
    hw = cfg.latent_hw
    if "latent_shape" in flags and list(flags["latent_shape"]) != [1, hw, hw]:
        raise BenchError(f"official latent_shape {flags['latent_shape']} does not fit img_size {cfg.img_size} "
                         f"and ch_mult {cfg.ch_mult}, which give [1, {hw}, {hw}]")
    return cfg


def transformer_config(spec, kind: str) -> TransformerConfig:
    """kind: 'absorbing' (bidirectional denoiser) or 'autoregressive' (causal prior)."""
    if kind not in ("absorbing", "autoregressive"):
        raise BenchError(f"unknown prior kind {kind!r}; expected 'absorbing' or 'autoregressive'")
    flags = resolve_hparams(spec)
    cfg = _checked(TransformerConfig, TransformerConfig(**_pick(flags, TRANSFORMER_FLAGS, f"{kind} transformer"),
                                                        causal=kind == "autoregressive"))
    for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
        setattr(cfg, k, float(getattr(cfg, k)))
    if cfg.n_head < 1 or cfg.n_emb % cfg.n_head:
        raise BenchError(f"official bert_n_emb {cfg.n_emb} is not divisible by bert_n_head {cfg.n_head}")
    return cfg


# ----------------------------------------------------------------------------- reading files

_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def read_official(path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an official .th file, keyed as saved. Non-tensor top-level entries are left out."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"official checkpoint {path} not found; download the official `logs` folder "
                         f"(see the official README, 'Pre-Trained Models') or fix the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe is None:
            raise BenchError(f"official checkpoint {path} is unreadable or truncated (its pickle is corrupt; "
                             f"not a file written by torch.save)") from None
        if not trust:
            raise BenchError(f"official checkpoint {path} holds more than tensors (its pickle needs "
                             f"{unsafe.group(1)}); bench reads tensors only. Loading it would run code from the "
                             f"file: pass --trust-checkpoint (trust=True) only if you trust its source") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - anything a trusted pickle raises is a bad file
            raise BenchError(f"official checkpoint {path} could not be loaded even trusted "
                             f"({type(e2).__name__}: {e2})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        first = str(e).split(". ")[0] or type(e).__name__
        raise BenchError(f"official checkpoint {path} is unreadable or truncated ({first})") from None
    if not isinstance(obj, Mapping):
        raise BenchError(f"official checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BenchError(f"official checkpoint {path} holds no tensors at its top level "
                         f"(keys: {', '.join(map(str, list(obj)[:5]))}); expected a state dict as the official "
                         f"training saves it")
    return tensors


def detect_kind(state: Mapping) -> str | None:
    for kind, prefix in PREFIX.items():
        if any(k.startswith(prefix) for k in state):
            return kind
    return None


def _dropped(kind: str, key: str) -> bool:
    if kind == "vq":
        return key.startswith(("disc.", "perceptual.", "ae.generator.logsigma."))
    if kind == "absorbing":
        return key in ("Lt_history", "Lt_count", "loss_history")
    return key.startswith("net.") and key.endswith(".attn.mask")


def official_state(state: Mapping, kind: str, path) -> dict[str, torch.Tensor]:
    """The tensors bench's module of `kind` takes, renamed (prefix stripped). A file of another kind,
    or keys the official module of this kind never has, are errors naming the file."""
    prefix = PREFIX[kind]
    found = detect_kind(state)
    if not any(k.startswith(prefix) for k in state):
        other = f"it looks like an official {found} file ({OFFICIAL_FILE[found]})" if found else \
            f"its keys begin {', '.join(sorted(state)[:3])}"
        raise BenchError(f"official checkpoint {path} is not an official {kind} file {OFFICIAL_FILE[kind]} "
                         f"(no keys under {prefix!r}); {other}")
    stray = sorted(k for k in state if not k.startswith(prefix) and not _dropped(kind, k))
    if stray:
        raise BenchError(f"official checkpoint {path} has keys the official {kind} file never has: "
                         f"{stray[:3]}{'...' if len(stray) > 3 else ''}")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not _dropped(kind, k)}


def _check_codebook(state: dict, key: str, codebook_size: int, path, what: str) -> None:
    if key in state and state[key].shape[0] != codebook_size:
        raise BenchError(f"official checkpoint {path}: {what} {key} has shape {tuple(state[key].shape)}, i.e. "
                         f"{state[key].shape[0]} codes, but the hyperparameters say codebook_size {codebook_size} "
                         f"(expected shape {(codebook_size, *state[key].shape[1:])})")


def _meta(kind: str, cfg, flags: dict, path: Path, sha256: str, trust: bool) -> dict:
    return {"kind": kind, "hparams": asdict(cfg), "official_hparams": flags,
            "source": {"format": SOURCE, "official_file": str(path), "sha256": sha256, "trusted_pickle": trust}}


def load_official_vq(path, hparams, trust: bool = False) -> tuple[VQAutoEncoder, dict]:
    """vqgan_ema_<step>.th -> (bench VQAutoEncoder in eval mode, meta as a bench checkpoint's)."""
    path = Path(path)
    flags = resolve_hparams(hparams)
    cfg = vq_config(flags)
    state = official_state(read_official(path, trust), "vq", path)
    _check_codebook(state, "quantize.embedding.weight", cfg.codebook_size, path, "codebook")
    model = _network(VQAutoEncoder, cfg, path)
    load_state_strict(model, state, f"{path} (official keys under 'ae.')")
    return model.eval(), _meta("vq", cfg, flags, path, file_sha256(path), trust)


def load_official_transformer(path, kind: str, hparams, trust: bool = False) -> tuple[Transformer, dict]:
    """absorbing_ema_<step>.th or autoregressive_ema_<step>.th -> (bench Transformer in eval mode, meta)."""
    path = Path(path)
    flags = resolve_hparams(hparams)
    cfg = transformer_config(flags, kind)
    state = official_state(read_official(path, trust), kind, path)
    _check_codebook(state, "head.weight", cfg.codebook_size, path, "output head")
    vocab = cfg.codebook_size + (0 if cfg.causal else 1)
    if "tok_emb.weight" in state and state["tok_emb.weight"].shape[0] != vocab:
        raise BenchError(f"official checkpoint {path}: tok_emb.weight has shape {tuple(state['tok_emb.weight'].shape)} "
                         f"but codebook_size {cfg.codebook_size} needs {vocab} input tokens "
                         f"(expected shape {(vocab, *state['tok_emb.weight'].shape[1:])})")
    model = _network(Transformer, cfg, path)
    load_state_strict(model, state, f"{path} (official keys under {PREFIX[kind]!r})")
    return model.eval(), _meta(kind, cfg, flags, path, file_sha256(path), trust)


def convert_official(vqgan_path, absorbing_path=None, autoregressive_path=None, *, hparams, out_dir,
                     trust: bool = False, force: bool = False) -> dict[str, Path]:
    """Official files -> bench checkpoints <out_dir>/vq, <out_dir>/absorbing, <out_dir>/autoregressive
    (safetensors + JSON). Everything is loaded and checked before anything is written.
    -> {kind: (stem written, official file name)}."""
    out = Path(out_dir)
    paths = {"vq": vqgan_path, "absorbing": absorbing_path, "autoregressive": autoregressive_path}
    for kind in (k for k, p in paths.items() if p is not None):  # the outputs first: loading can take minutes
        check_writable(out / f"{kind}.safetensors", force)
        check_writable(out / f"{kind}.json", force)
    loaded = {"vq": load_official_vq(vqgan_path, hparams, trust)}
    for kind, path in (("absorbing", absorbing_path), ("autoregressive", autoregressive_path)):
        if path is not None:
            loaded[kind] = load_official_transformer(path, kind, hparams, trust)
    written = {}
    for kind, (model, meta) in loaded.items():
        meta = {**meta, "source": {**meta["source"], "official_file": Path(meta["source"]["official_file"]).name}}
        written[kind] = save_checkpoint(out / kind, model.state_dict(), meta), meta["source"]["official_file"]
    return written
