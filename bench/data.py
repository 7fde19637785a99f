"""Datasets: every source yields uint8 images of shape (H, W, C), indexable and sized.

Kinds (the `kind` of a [datasets.NAME] table in bench.toml):
- digits: scikit-learn's 8x8 handwritten digits (values 0..16), embedded, no files needed.
- folder: any folder of images, searched recursively.
- lsun: an LSUN LMDB whose values are encoded image bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import BenchError
from .paths import env_names, expand_path

DIGITS_SPLITS = ("train", "heldout")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ON_CORRUPT = ("error", "skip")
# Pillow modes whose samples are 8 bits (or 1 bit): convert() to L or RGB keeps their values. Alpha is
# dropped, palettes are expanded; 16-bit (I;16*), 32-bit (I) and float (F) images are refused.
EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "La", "RGBa"}


class HashCache:
    """sha256 of files' bytes, remembered by path and (size, mtime, inode, ctime) in a JSON file, so a
    large dataset is read once to key its reference features and not again while its files stay
    unchanged. The inode and ctime catch a replacement that restores the old size and mtime (cp -p,
    touch -r), which nobody can set back. `reads` counts the files actually read (the tests count it)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.entries: dict = {}
        self.reads = 0
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is rebuilt, never trusted

    def sha256(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        known = self.entries.get(key)
        if isinstance(known, list) and len(known) == 5 and known[:4] == stamp and isinstance(known[4], str):
            return known[4]
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.reads += 1
        self.entries[key] = stamp + [h.hexdigest()]
        return h.hexdigest()

    def save(self) -> None:
        """Write the cache (callers do so once the run is under way, so a refused run leaves nothing)."""
        if self.path is not None:
            from .checkpoints import atomic_write_text
            atomic_write_text(self.path, json.dumps(self.entries))


class ArrayImages:
    """Images held in memory as one uint8 array (N, H, W, C)."""

    def __init__(self, images: np.ndarray, content_id: str):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise BenchError(f"expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
        self.images = images
        self._content_id = content_id

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]

    @property
    def resolution(self) -> int:
        return self.images.shape[1]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def content_id(self, hashes: HashCache | None = None) -> str:
        return self._content_id


def upsample_digits(raw: np.ndarray, resolution: int) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> (N, R, R, 1) uint8.

    Grey levels are scaled to 0..255 (v * 255 / 16), then resized with bilinear interpolation
    (half-pixel centres, align_corners=False), and rounded. At R = 16 every source pixel becomes a
    2x2 block blended with its neighbours, so strokes stay smooth rather than blocky.
    """
    x = torch.from_numpy(raw.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    if resolution != raw.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def digits_split(split: str, resolution: int = 16, heldout_size: int = 500, split_seed: int = 0) -> ArrayImages:
    """A fixed split of the 1797 digits: `heldout_size` images chosen by a seeded permutation are
    held out; the rest ("train") train the models and serve as the metrics' reference."""
    if split not in DIGITS_SPLITS:
        raise BenchError(f"unknown digits split {split!r}; expected one of {DIGITS_SPLITS}")
    from sklearn.datasets import load_digits

    raw = load_digits().images  # (1797, 8, 8) float64 in 0..16
    if not 0 < heldout_size < len(raw):
        raise BenchError(f"digits heldout_size must lie in 1..{len(raw) - 1}, got {heldout_size}")
    order = np.random.default_rng(split_seed).permutation(len(raw))
    idx = np.sort(order[:heldout_size] if split == "heldout" else order[heldout_size:])
    images = upsample_digits(raw[idx], resolution)
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    return ArrayImages(images, f"digits-{split}-{resolution}-{digest}")


def digits_labels(split: str, heldout_size: int = 500, split_seed: int = 0) -> np.ndarray:
    """Class labels in the same order as digits_split (used to train the digits extractor)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    order = np.random.default_rng(split_seed).permutation(len(target))
    idx = np.sort(order[:heldout_size] if split == "heldout" else order[heldout_size:])
    return target[idx]


# -----------------------------------------------------------------------------
# real images: a folder of files, or an LSUN LMDB


class _Preprocess:
    """PIL image -> uint8 (R, R, C): convert to RGB or L, then torchvision Resize(R) (shorter side,
    bilinear, antialiased) and CenterCrop(R), as in the paper's official data loading."""

    def __init__(self, resolution: int, channels: int):
        from torchvision import transforms

        if channels not in (1, 3):
            raise BenchError(f"dataset channels must be 1 or 3, got {channels}")
        if not isinstance(resolution, int) or resolution < 1:
            raise BenchError(f"dataset resolution must be a positive integer, got {resolution!r}")
        self.resolution = resolution
        self.channels = channels
        self.mode = "RGB" if channels == 3 else "L"
        self.transform = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution)])

    def __call__(self, image) -> np.ndarray:
        if image.mode not in EIGHT_BIT_MODES:
            # 16-bit, 32-bit integer and float images would be clipped to 0..255 by convert(): refuse
            raise ValueError(f"image mode {image.mode!r} is not 8-bit ({', '.join(sorted(EIGHT_BIT_MODES))}); "
                             f"convert the file to 8-bit")
        x = np.asarray(self.transform(image.convert(self.mode)), dtype=np.uint8)
        return x[:, :, None] if x.ndim == 2 else x


# what Pillow raises on bad data: UnidentifiedImageError is an OSError; truncated data raises
# OSError or SyntaxError; absurd sizes raise DecompressionBombError
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _decode(source, preprocess: _Preprocess) -> np.ndarray:
    """Decode a path or a file object; raises one of _DECODE_ERRORS on bad data."""
    with Image.open(source) as image:
        return preprocess(image)


def _decodes(open_source) -> bool:
    """Whether the image passes Pillow's verify() and then fully loads. verify() leaves the image
    unusable, so the source is opened twice."""
    try:
        with Image.open(open_source()) as image:
            image.verify()
        with Image.open(open_source()) as image:
            image.load()
    except _DECODE_ERRORS:
        return False
    return True


def _validate_on_corrupt(on_corrupt: str):
    if on_corrupt not in ON_CORRUPT:
        raise BenchError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


def _progress(items, what: str, enabled: bool):
    from tqdm import tqdm
    # None: tqdm shows the bar on a terminal only
    return tqdm(items, desc=f"verifying {what}", unit="img", disable=None if enabled else True, leave=False)


def list_image_files(root: Path, odd: list[Path] | None = None) -> list[Path]:
    """Every image file under root, recursively, sorted by relative path (as a POSIX string). Names
    with an image extension that are not regular files (a broken symlink, a pipe) are left out and,
    where `odd` is given, appended to it, so that they are never dropped unsaid."""
    files = []
    for p in root.rglob("*"):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.is_dir():
            continue
        (files if p.is_file() else odd if odd is not None else []).append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class _DecodedImages:
    """What folder and LMDB sources share: images decoded and preprocessed on access."""
    preprocess: _Preprocess

    @property
    def resolution(self) -> int:
        return self.preprocess.resolution

    @property
    def channels(self) -> int:
        return self.preprocess.channels


class FolderImages(_DecodedImages):
    """Every image file under a folder, recursively, in sorted relative-path order.

    on_corrupt="error": nothing is checked up front; __getitem__ on a bad file raises BenchError.
    on_corrupt="skip": every file is decoded once in the constructor and bad ones are dropped;
    their paths are kept in self.skipped so the harness can report them.
    """

    def __init__(self, root, resolution: int, channels: int = 3, on_corrupt: str = "error"):
        _validate_on_corrupt(on_corrupt)
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise BenchError(f"dataset folder {self.root} does not exist; set the dataset's path in bench.toml")
        if not self.root.is_dir():
            raise BenchError(f"dataset path {self.root} is not a directory; point the dataset's path in bench.toml at a folder of images")
        self.preprocess = _Preprocess(resolution, channels)
        self.on_corrupt = on_corrupt
        odd: list[Path] = []
        self.files = list_image_files(self.root, odd)
        if odd and on_corrupt == "error":
            raise BenchError(f"dataset file {odd[0]} is not a regular file (a broken symlink, a pipe, a device); "
                             f"replace or delete it, or set on_corrupt = \"skip\"")
        if not self.files:
            raise BenchError(f"dataset folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); check the dataset's path in bench.toml")
        self.skipped: list[Path] = sorted(odd)
        if on_corrupt == "skip":
            self.skipped += self.verify()
            bad = set(self.skipped)
            self.files = [p for p in self.files if p not in bad]
            if not self.files:
                raise BenchError(f"dataset folder {self.root}: none of its {len(self.skipped)} images decode")

    def verify(self, progress: bool = True) -> list[Path]:
        """Open every file (Pillow verify + full load); return the paths that fail."""
        bad = []
        for path in _progress(self.files, str(self.root), progress):
            if not _decodes(lambda: path):
                bad.append(path)
        return bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        path = self.files[i]
        try:
            return _decode(path, self.preprocess)
        except _DECODE_ERRORS as e:
            raise BenchError(f"cannot decode image {path} ({type(e).__name__}: {e}); replace or delete it, or set on_corrupt = \"skip\"") from e

    def content_id(self, hashes: HashCache | None = None) -> str:
        """A hash of every file's name and bytes (not their sizes alone: same-size replacements count)."""
        hashes = hashes or HashCache()
        h = hashlib.sha256(f"folder {self.resolution} {self.channels}\n".encode())
        for path in self.files:
            h.update(f"{path.relative_to(self.root).as_posix()}\t{hashes.sha256(path)}\n".encode())
        return h.hexdigest()[:16]


# (pid, environment) per resolved path: py-lmdb refuses to open the same files twice in one process,
# so every dataset on a path shares one environment. A forked DataLoader worker must not use its
# parent's environment, so it closes the inherited handle (which frees the files) and opens its own.
_LMDB_ENVS: dict[str, tuple[int, object]] = {}


def _lmdb_env(path: Path):
    import lmdb  # imported here so that digits and folders work without lmdb installed

    key = str(path.resolve())
    pid, env = _LMDB_ENVS.get(key, (None, None))
    if env is not None and pid == os.getpid():
        return env
    if env is not None:
        env.close()
    if path.is_dir() and not (path / "data.mdb").exists():
        raise BenchError(f"{path} is not an LMDB (no data.mdb inside); point the dataset's path in bench.toml at an LSUN LMDB")
    try:
        env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=path.is_dir())
    except lmdb.Error as e:
        raise BenchError(f"{path} is not an LMDB ({e}); point the dataset's path in bench.toml at an LSUN LMDB") from e
    # LMDB maps its file into memory: reading a page past the end of a truncated file kills the process
    # (SIGBUS), so the file must hold every page its meta page counts
    data_file = path / "data.mdb" if path.is_dir() else path
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    if data_file.stat().st_size < need:
        env.close()
        raise BenchError(f"LMDB {path} is truncated: {data_file} holds {data_file.stat().st_size} bytes, its pages "
                         f"need {need}; copy the database again")
    _LMDB_ENVS[key] = (os.getpid(), env)
    return env


def _key_name(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


class LmdbImages(_DecodedImages):
    """An LSUN-style LMDB: every key maps to one encoded image (webp, jpeg or png), read in sorted
    key order. Same interface and on_corrupt semantics as FolderImages (self.skipped holds keys)."""

    def __init__(self, path, resolution: int, channels: int = 3, on_corrupt: str = "error"):
        _validate_on_corrupt(on_corrupt)
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise BenchError(f"LMDB {self.path} does not exist; set the dataset's path in bench.toml")
        self.preprocess = _Preprocess(resolution, channels)
        self.on_corrupt = on_corrupt
        env = _lmdb_env(self.path)
        self.entries = env.stat()["entries"]
        import lmdb
        try:
            with env.begin() as txn:
                self.keys = sorted(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as e:
            raise BenchError(f"LMDB {self.path} is corrupt ({e}); copy the database again") from None
        if not self.keys:
            raise BenchError(f"LMDB {self.path} holds no records; check the dataset's path in bench.toml")
        self.skipped: list[bytes] = []
        if on_corrupt == "skip":
            self.skipped = self.verify()
            bad = set(self.skipped)
            self.keys = [k for k in self.keys if k not in bad]
            if not self.keys:
                raise BenchError(f"LMDB {self.path}: none of its {len(self.skipped)} records decode")

    def _value(self, txn, key: bytes) -> bytes:
        import lmdb
        try:
            value = txn.get(key)
        except lmdb.Error as e:
            raise BenchError(f"LMDB {self.path} is corrupt at key {_key_name(key)!r} ({e}); copy the database again") from None
        if value is None:
            raise BenchError(f"LMDB {self.path} has no record for key {_key_name(key)!r}; the database changed after it was opened")
        return value

    def verify(self, progress: bool = True) -> list[bytes]:
        """Decode every record (Pillow verify + full load); return the keys that fail."""
        bad = []
        with _lmdb_env(self.path).begin() as txn:
            for key in _progress(self.keys, str(self.path), progress):
                value = self._value(txn, key)
                if not _decodes(lambda: io.BytesIO(value)):
                    bad.append(key)
        return bad

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> np.ndarray:
        key = self.keys[i]
        with _lmdb_env(self.path).begin() as txn:
            value = self._value(txn, key)
        try:
            return _decode(io.BytesIO(value), self.preprocess)
        except _DECODE_ERRORS as e:
            raise BenchError(f"cannot decode record {_key_name(key)!r} of LMDB {self.path} ({type(e).__name__}: {e}); set on_corrupt = \"skip\" to drop bad records") from e

    def content_id(self, hashes: HashCache | None = None) -> str:
        """A hash of every key and value. The LMDB's data file is hashed once per (size, mtime) and
        remembered: values cannot change without changing that file."""
        hashes = hashes or HashCache()
        data_file = self.path / "data.mdb" if self.path.is_dir() else self.path
        h = hashlib.sha256(f"lsun {self.resolution} {self.channels} {len(self.keys)}\n".encode())
        h.update(hashes.sha256(data_file).encode())
        for key in self.keys:  # the records used: skipped ones are left out
            h.update(key)
            h.update(b"\n")
        return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# sources: a dataset table of bench.toml names its `kind`; the source says where its splits are,
# how they are preprocessed (part of the reference cache key) and how to describe them.


@dataclass(frozen=True)
class DigitsSource:
    """scikit-learn's 1797 digits, embedded: a fixed seeded split, bilinear upsampling."""
    resolution: int
    channels: int
    heldout_size: int = 500
    split_seed: int = 0
    kind = "digits"
    preprocessing = "digits-bilinear"
    keys = ("heldout_size", "split_seed")   # its own keys of a [datasets.NAME] table

    @classmethod
    def from_config(cls, kind: str, resolution: int, channels: int, options: dict, where: str, key: str):
        if options.get("split_seed", 0) < 0:
            raise BenchError(f"{where}: {key}.split_seed must be >= 0, got {options['split_seed']}")
        return cls(resolution, channels, **options)

    def has_split(self, split: str) -> bool:
        return split in DIGITS_SPLITS

    def open(self, split: str) -> ArrayImages:
        return digits_split(split, self.resolution, self.heldout_size, self.split_seed)

    def describe(self) -> dict[str, str]:
        return {"data": "digits: scikit-learn's 1797 8x8 digits, embedded in the package (always present)"}

    def content_id(self, split: str) -> str:
        return self.open(split).content_id()


@dataclass(frozen=True)
class FileSource:
    """Image files: a folder searched recursively (`folder`) or an LSUN LMDB (`lsun`); torchvision's
    Resize and CenterCrop to `resolution`, as the official data loading. `train` and `heldout` are
    paths as bench.toml writes them (${VAR} and ~ are expanded when a split is opened)."""
    resolution: int
    channels: int
    train: str
    heldout: str | None = None
    on_corrupt: str = "error"
    kind: str = "folder"
    where: str = "bench.toml"   # for errors: the config file and the dataset's dotted key
    key: str = "datasets.?"
    preprocessing = "resize+centercrop"
    keys = ("train", "heldout", "on_corrupt")

    @classmethod
    def from_config(cls, kind: str, resolution: int, channels: int, options: dict, where: str, key: str):
        if "train" not in options:
            raise BenchError(f"{where}: {key}.train (the path of the reference split) is missing")
        if options.get("on_corrupt", "error") not in ON_CORRUPT:
            raise BenchError(f"{where}: {key}.on_corrupt must be one of {ON_CORRUPT}")
        return cls(resolution, channels, kind=kind, where=where, key=key, **options)

    def has_split(self, split: str) -> bool:
        return getattr(self, split, None) is not None

    def path(self, split: str) -> Path:
        if not self.has_split(split):
            raise BenchError(f"{self.where}: {self.key}.{split} is not set; add the path of its {split} split")
        return expand_path(getattr(self, split), f"{self.key}.{split}", self.where)

    def open(self, split: str):
        images = FolderImages if self.kind == "folder" else LmdbImages
        return images(self.path(split), self.resolution, self.channels, self.on_corrupt)

    def describe(self) -> dict[str, str]:
        out = {}
        for split in ("train", "heldout"):
            if not self.has_split(split):
                continue
            try:
                path = self.path(split)
            except BenchError as e:
                out[split] = f"not available: {e}"
                continue
            out[split] = _describe_path(self.kind, path)
            if not path.exists():
                names = env_names(getattr(self, split))
                via = f"${', $'.join(names)} or " if names else ""
                out[split] += f"; set {via}{self.key}.{split} (= {getattr(self, split)!r}) in {self.where}"
        return out


def _describe_path(kind: str, path: Path) -> str:
    if not path.exists():
        return f"{kind}: {path} (missing)"
    if kind == "folder":
        if not path.is_dir():
            return f"folder: {path} (not a directory)"
        return f"folder: {path} (present, {len(list_image_files(path))} image files)"
    try:
        return f"lsun: {path} (present, LMDB with {_lmdb_env(path).stat()['entries']} records)"
    except BenchError:
        return f"lsun: {path} (not an LMDB)"


# bench.toml's `kind` -> the source class that reads it
SOURCES = {"digits": DigitsSource, "folder": FileSource, "lsun": FileSource}
DATASET_KINDS = tuple(SOURCES)


def iterate_batches(images, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Yield uint8 batches (B, H, W, C) of the first `limit` images (all by default)."""
    n = len(images) if limit is None else min(limit, len(images))
    for start in range(0, n, batch_size):
        yield np.stack([images[i] for i in range(start, min(start + batch_size, n))])


def to_float(batch: np.ndarray | torch.Tensor, device="cpu") -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    x = torch.as_tensor(batch, device=device)
    return x.permute(0, 3, 1, 2).float().div(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in [0, 1] -> uint8 (B, H, W, C), rounded and clipped."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
