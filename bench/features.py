"""Feature extractors: one registry, one entry point.

    ext = load_extractor("digits")          # Extractor: .name, .dim, .weights_sha256
    feats = ext(batch)                       # uint8 (B, H, W, C) -> float64 (B, dim)
    feats = extract_features(ext, batches)   # a stream of batches -> (N, dim)

Every extractor is a torch-fidelity FeatureExtractorBase underneath, so torch-fidelity's own
calculate_metrics(feature_extractor="bench-digits", ...) sees exactly the features bench scores.

Registered extractors (EXTRACTORS):
- digits: a small CNN classifier trained on the digits "train" split (bench.data); its 128-d
  penultimate layer is the feature, the way Inception's pool layer is for FID. 16x16 input.
- inception-v3-compat: the standard FID network (torch-fidelity's, 2048-d pool features), weights
  found offline by bench.inception. Any size (it resizes to 299 itself).
- clip: torch-fidelity's clip-vit-b-32 (512-d), from OpenAI's ViT-B-32.pt at $BENCH_CLIP_WEIGHTS.
- dinov2: torch-fidelity's dinov2-vit-l-14 (1024-d), from dinov2_vitl14_pretrain.pth at
  $BENCH_DINOV2_WEIGHTS and a local copy of the facebookresearch/dinov2 hub repository.
None of them downloads anything: missing weights are a BenchError that says where to put them.
Grey images are replicated to RGB for the three ImageNet networks.
"""
from __future__ import annotations

import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_MODELS, FeatureExtractorDinoV2
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from . import inception
from .checkpoints import checkpoint_sha256, file_sha256, load_checkpoint, load_state_strict, resolve, save_checkpoint
from .data import digits_labels, digits_split, to_float
from .errors import BenchError, reason

DIGITS_STEM = "builtin:digits/extractor"
DIGITS_RESOLUTION = 16

# -----------------------------------------------------------------------------
# the digits classifier


class DigitsNet(nn.Module):
    """16x16 grey images in [0, 1] -> 10 logits; `features` gives the 128-d penultimate layer."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)              # 16x16 -> pool 8x8
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)      # 8x8 -> pool 4x4
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)  # 4x4 -> pool 2x2
        self.fc1 = nn.Linear(2 * width * 2 * 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        # the feature is taken before the ReLU: units that are dead on some images would otherwise
        # give the covariance of FID exact zero rows and columns
        return self.fc1(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.features(x))))


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with zeros (background)."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def classifier_accuracy(model: DigitsNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on uint8 images (N, H, W, 1)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(to_float(images[start:start + batch_size]))
        correct += (logits.argmax(1).numpy() == labels[start:start + batch_size]).sum()
    return float(correct) / len(images)


def train_digits_extractor(out_stem: str = DIGITS_STEM, seed: int = 0, epochs: int = 30, batch_size: int = 64,
                           lr: float = 2e-3, weight_decay: float = 1e-4, max_shift: int = 1,
                           width: int = 32, feature_dim: int = 128, dropout: float = 0.3,
                           steps: int | None = None) -> dict:
    """Train DigitsNet on the digits train split, score it on the held-out split, save it. -> meta.
    steps: optimizer steps in all, overriding epochs (the one-cycle schedule spans them)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = digits_split("train", resolution=DIGITS_RESOLUTION)
    x_train = to_float(train.images)
    y_train = torch.from_numpy(digits_labels("train")).long()

    hparams = dict(width=width, feature_dim=feature_dim, num_classes=10, dropout=dropout)
    model = DigitsNet(**hparams)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    steps = steps or epochs * steps_per_epoch
    epochs = math.ceil(steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)

    t0 = time.time()
    done = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            if done == steps:
                break
            idx = order[start:start + batch_size]
            xb = random_shift(x_train[idx], max_shift, generator)
            loss = F.cross_entropy(model(xb), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            done, seen = done + 1, seen + len(idx)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total_loss / seen:.4f}")
    train_seconds = time.time() - t0

    heldout = digits_split("heldout", resolution=DIGITS_RESOLUTION)
    acc = classifier_accuracy(model, heldout.images, digits_labels("heldout"))
    print(f"held-out accuracy {acc:.4f} ({train_seconds:.1f} s)")
    meta = {
        "kind": "extractor",
        "hparams": hparams,
        "heldout_accuracy": acc,
        "train": dict(seed=seed, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      max_shift=max_shift, optimizer="AdamW", schedule="one-cycle",
                      dataset=train.content_id(), seconds=round(train_seconds, 1)),
    }
    save_checkpoint(out_stem, model.state_dict(), meta)
    return meta


def load_digits_net(stem: str = DIGITS_STEM) -> tuple[DigitsNet, dict]:
    state, meta = load_checkpoint(stem, kind="extractor")
    hparams = meta.get("hparams")
    try:
        if not isinstance(hparams, dict):
            raise TypeError("`hparams` must be an object")
        model = DigitsNet(**hparams)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BenchError(f"checkpoint {resolve(stem).with_suffix('.json')}: its hparams do not make a DigitsNet "
                         f"({e})") from None
    load_state_strict(model, state, str(resolve(stem)))
    return model.eval(), meta


# -----------------------------------------------------------------------------
# torch-fidelity side: uint8 (B, C, H, W) in, a tuple of feature tensors out


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of DigitsNet. Features: "128" (penultimate layer), "logits"."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, _ = load_digits_net(feature_extractor_weights_path or DIGITS_STEM)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise BenchError("digits extractor expects a torch.uint8 tensor (B, C, H, W)")
        x = x.float().div(255.0)
        if x.shape[1] == 3:  # torch-fidelity hands image files over as RGB
            x = x.mean(dim=1, keepdim=True)
        features = self.net.features(x)
        out = {"128": features, "logits": self.net.fc2(F.relu(features))}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, DIGITS_RESOLUTION, DIGITS_RESOLUTION, dtype=torch.uint8)


if "bench-digits" not in FEATURE_EXTRACTORS_REGISTRY:  # importing twice (reload) must not fail
    torch_fidelity.register_feature_extractor("bench-digits", DigitsFeatureExtractor)

# -----------------------------------------------------------------------------
# harness side


@dataclass
class Extractor:
    """A torch-fidelity extractor module plus what the harness records about it."""

    name: str
    module: FeatureExtractorBase  # built with exactly one requested feature
    dim: int
    weights_sha256: str
    resolution: int | None  # required H = W, or None where the module resizes itself
    channels: tuple[int, ...]  # accepted C
    device: str = "cpu"

    @torch.no_grad()
    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W, C) -> float64 (B, dim)."""
        x = torch.as_tensor(batch)
        expected = (f"uint8 images (B, H, W, C) with C in {self.channels}"
                    + (f" and H = W = {self.resolution}" if self.resolution else ""))
        if x.dtype != torch.uint8:
            raise BenchError(f"extractor {self.name!r} expects {expected}, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[3] not in self.channels or (
                self.resolution is not None and tuple(x.shape[1:3]) != (self.resolution, self.resolution)):
            raise BenchError(f"extractor {self.name!r} expects {expected}, got shape {tuple(x.shape)}")
        (features,) = self.module(x.permute(0, 3, 1, 2).contiguous().to(self.device))
        return features.double().cpu().numpy()


def _digits_extractor(device: str = "cpu", weights_path: str | None = None) -> Extractor:
    stem = weights_path or DIGITS_STEM
    module = DigitsFeatureExtractor("bench-digits", ["128"], feature_extractor_weights_path=stem).to(device)
    return Extractor(name="digits", module=module, dim=module.net.fc1.out_features,
                     weights_sha256=checkpoint_sha256(stem), resolution=DIGITS_RESOLUTION,
                     channels=(1, 3), device=device)


class GreyAsRGB:
    """Mixin for torch-fidelity's RGB extractors: a single channel is replicated to three."""

    def forward(self, x):
        if torch.is_tensor(x) and x.dim() == 4 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return super().forward(x)


class InceptionFeatureExtractor(GreyAsRGB, FeatureExtractorInceptionV3):
    pass


class CLIPFeatureExtractor(GreyAsRGB, FeatureExtractorCLIP):
    pass


class DinoV2FeatureExtractor(GreyAsRGB, FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 extractor built from local files: torch-fidelity itself only loads it
    through torch.hub from GitHub (which needs the network) and rejects a weights path."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, repo_dir=None, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)
        self.feature_extractor_internal_dtype = torch.float32
        os.environ["XFORMERS_DISABLED"] = "1"  # as torch-fidelity does: the same attention code everywhere
        self.model = torch.hub.load(str(repo_dir), DINOV2_MODELS[name], source="local", pretrained=False)
        self.model.load_state_dict(torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()


def _inception_extractor(device: str = "cpu", weights_path: str | None = None) -> Extractor:
    weights = inception.resolve_weights(weights_path)
    module = inception.load_inception([str(inception.POOL_DIM)], weights, cls=InceptionFeatureExtractor).to(device)
    return Extractor(name=inception.NAME, module=module, dim=inception.POOL_DIM, weights_sha256=weights.sha256,
                     resolution=None, channels=(1, 3), device=device)


def _weights_from_env(name: str, weights_path: str | None, variable: str, what: str) -> str:
    path = weights_path or os.environ.get(variable)
    if not path:
        raise BenchError(f"the {name} extractor needs {what} on this machine; set ${variable} to its path "
                         f"(bench never downloads weights)")
    if not os.path.isfile(path):
        raise BenchError(f"{name} extractor weights {path} (from ${variable} or the argument) do not exist")
    return path


CLIP_MODEL = "clip-vit-b-32"
DINOV2_MODEL = "dinov2-vit-l-14"


def _clip_extractor(device: str = "cpu", weights_path: str | None = None) -> Extractor:
    path = _weights_from_env("clip", weights_path, "BENCH_CLIP_WEIGHTS", "OpenAI's CLIP TorchScript file ViT-B-32.pt")
    try:
        with warnings.catch_warnings():  # torch-fidelity reads the file with the deprecated torch.jit.load
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated")
            module = CLIPFeatureExtractor(CLIP_MODEL, ["clip"], feature_extractor_weights_path=path).to(device)
    except (RuntimeError, KeyError, ValueError) as e:
        raise BenchError(f"clip extractor weights {path} are not OpenAI's ViT-B-32 TorchScript ({reason(e)})") from None
    return Extractor(name="clip", module=module, dim=module.model.visual.output_dim, weights_sha256=file_sha256(path),
                     resolution=None, channels=(1, 3), device=device)


def _dinov2_extractor(device: str = "cpu", weights_path: str | None = None) -> Extractor:
    path = _weights_from_env("dinov2", weights_path, "BENCH_DINOV2_WEIGHTS", "dinov2_vitl14_pretrain.pth")
    repo = os.environ.get("BENCH_DINOV2_REPO") or os.path.join(torch.hub.get_dir(), "facebookresearch_dinov2_main")
    if not os.path.isfile(os.path.join(repo, "hubconf.py")):
        raise BenchError(f"the dinov2 extractor needs a local copy of the facebookresearch/dinov2 repository; "
                         f"none at {repo}: set $BENCH_DINOV2_REPO to a checkout")
    try:
        module = DinoV2FeatureExtractor(DINOV2_MODEL, ["dinov2"], feature_extractor_weights_path=path,
                                        repo_dir=repo).to(device)
    except (RuntimeError, KeyError) as e:
        raise BenchError(f"dinov2 extractor weights {path} do not fit {DINOV2_MODEL} ({e})") from None
    return Extractor(name="dinov2", module=module, dim=module.model.embed_dim, weights_sha256=file_sha256(path),
                     resolution=None, channels=(1, 3), device=device)


EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "digits": _digits_extractor,
    inception.NAME: _inception_extractor,
    "clip": _clip_extractor,
    "dinov2": _dinov2_extractor,
}


def load_extractor(name: str, device: str = "cpu", *, weights_path: str | os.PathLike | None = None) -> Extractor:
    """weights_path: a checkpoint stem for digits, a weights file for the others (default: their
    built-in, cached or environment-variable location)."""
    if name not in EXTRACTORS:
        raise BenchError(f"unknown feature extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](device=device, weights_path=str(weights_path) if weights_path else None)


def extract_features(extractor: Extractor, batches: Iterable[np.ndarray], total: int | None = None,
                     desc: str = "features", progress: bool = True) -> np.ndarray:
    """Features of a stream of uint8 batches (B, H, W, C) -> float64 (N, dim); `total` counts images."""
    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            out.append(extractor(batch))
            bar.update(len(out[-1]))
    if not out:
        return np.zeros((0, extractor.dim), dtype=np.float64)
    return np.concatenate(out)


if __name__ == "__main__":
    train_digits_extractor()


# ----------------------------------------------------------------------------- feature files

def features_of_folder(images_dir, extractor_name: str, out: Path, resolution: int | None, channels: int,
                       batch_size: int, device: str, weights=None, progress: bool = True, force: bool = False) -> str:
    """`bench features`: features of every image under images_dir (recursively, sorted by path) to
    out (.npz: features, files, extractor, weights_sha256, resolution, channels). -> a line to print."""
    from PIL import Image
    from .checkpoints import atomic_write_bytes, check_writable
    from .data import FolderImages
    from .execution import check_device
    check_writable(Path(out), force)
    check_device(torch.device(device))
    ext = load_extractor(extractor_name, device, weights_path=weights)
    if channels not in ext.channels:
        raise BenchError(f"extractor {ext.name!r} takes {ext.channels} channels, not {channels}")
    if resolution is not None and ext.resolution is not None and resolution != ext.resolution:
        raise BenchError(f"extractor {ext.name!r} takes {ext.resolution}px images; --resolution {resolution} "
                         f"does not fit it (leave it out)")
    resolution = resolution or ext.resolution
    if resolution is None:  # an extractor that resizes itself: keep same-sized square images unchanged
        first = FolderImages(images_dir, resolution=1, channels=channels).files[0]
        try:
            with Image.open(first) as image:
                resolution = min(image.size)
        except OSError as e:
            raise BenchError(f"cannot read image {first} ({e}); pass --resolution") from None
    images = FolderImages(images_dir, resolution=resolution, channels=channels)

    def batches():
        for start in range(0, len(images), batch_size):
            yield np.stack([images[i] for i in range(start, min(start + batch_size, len(images)))])

    feats = extract_features(ext, batches(), total=len(images), desc=ext.name, progress=progress)
    files = [p.relative_to(images.root).as_posix() for p in images.files]
    buf = io.BytesIO()
    np.savez(buf, features=feats, files=np.array(files), extractor=np.array(ext.name),
             weights_sha256=np.array(ext.weights_sha256), resolution=resolution, channels=channels)
    atomic_write_bytes(Path(out), buf.getbuffer())
    return f"wrote {out}: features {feats.shape} ({ext.name}, {resolution}px, {channels} channel(s))"


def load_feature_file(path: str) -> dict:
    """A file `bench features` wrote: its features (N, D) finite floats, extractor and weights hash."""
    import zipfile
    p = Path(path)
    if p.exists() and not p.is_file():
        raise BenchError(f"feature file {path} is not a regular file")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise BenchError(f"feature file {path} is a .npy array, not the .npz that `bench features` writes")
        with f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise BenchError(f"feature file {path} not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BenchError(f"feature file {path} is not a readable .npz ({e})") from None
    missing = [k for k in ("features", "extractor", "weights_sha256") if k not in data]
    if missing:
        raise BenchError(f"feature file {path} lacks {', '.join(missing)}; write it with `bench features`")
    feats = data["features"]
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number) or np.issubdtype(feats.dtype, np.complexfloating):
        raise BenchError(f"feature file {path}: `features` must be a 2-d array of real numbers, "
                         f"got {feats.dtype} of shape {feats.shape}")
    return {"features": feats, "extractor": str(data["extractor"]), "weights_sha256": str(data["weights_sha256"])}
