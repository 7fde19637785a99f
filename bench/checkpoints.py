"""Harness checkpoints: <stem>.safetensors (tensors only) beside <stem>.json (kind, hyperparameters,
training record). Built-in checkpoints live in bench/weights/ and are named `builtin:digits/vq`."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import BenchError

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN = "builtin:"


def resolve(stem: str | os.PathLike) -> Path:
    """'builtin:digits/vq' -> bench/weights/digits/vq; paths are returned as given (no suffix)."""
    s = str(stem)
    path = WEIGHTS_DIR / s[len(BUILTIN):] if s.startswith(BUILTIN) else Path(s)
    if path.name in ("", ".", ".."):
        raise BenchError(f"checkpoint {s!r} names no file; expected a stem such as builtin:digits/vq or "
                         f"path/to/model (for model.safetensors and model.json)")
    return path.with_suffix("") if s.endswith((".safetensors", ".json")) else path


def write_error(path, e: OSError) -> BenchError:
    """One line naming the file for an OSError while writing it (a full disk says so)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return BenchError(f"cannot write {path}: disk full ({e.strerror or e}); free some space and rerun")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir under a file, or a file where a folder goes
        return BenchError(f"cannot write {path}: a part of its path is a file, not a folder")
    if e.errno == errno.ENAMETOOLONG:
        return BenchError(f"cannot write {path}: the name is too long for the file system")
    return BenchError(f"cannot write {path} ({e.strerror or e})")


def check_name_lengths(path: Path, what: str) -> None:
    """Every name on the path fits the file system (255 bytes): a longer one fails every stat()."""
    too_long = [part for part in Path(path).parts if len(os.fsencode(part)) > 255]
    if too_long:
        raise BenchError(f"cannot write {what}: the name {too_long[0][:40]}... is longer than 255 bytes")


def check_folder(folder, what: str) -> None:
    """`folder` is a folder or can be made one (nothing on its path is a file, no name is too long).
    Checked before any work, so an impossible output never costs a computation. what: the thing to be
    written there, for the message."""
    folder = Path(folder)
    check_name_lengths(folder, what)
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise BenchError(f"cannot write {what}: {p} is a file, not a folder")
            return


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.
    An OSError (disk full, permissions) leaves no temporary file and becomes a BenchError naming path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_writable(path: Path, force: bool) -> None:
    """An output file may be written: it is not a folder or a symlink, and an existing one is replaced
    only with --force."""
    path = Path(path)
    check_name_lengths(path, f"output {str(path)[:60]}")
    if path.is_symlink() or path.is_dir():
        raise BenchError(f"output {path} is a folder or a symlink; give a plain file path")
    if path.exists() and not force:
        raise BenchError(f"output {path} exists; pass --force to overwrite it or choose another path")
    check_folder(path.parent, f"output {path}")


def save_checkpoint(stem: str | os.PathLike, state_dict: dict, meta: dict) -> Path:
    """meta must hold `kind` (vq, absorbing, autoregressive, extractor) and `hparams`."""
    path = resolve(stem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path.with_suffix(".safetensors"), e) from None
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path.with_suffix(".safetensors"))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(stem: str | os.PathLike, kind: str | None = None) -> tuple[dict, dict]:
    """-> (state_dict, meta). Errors name the file and what was expected."""
    path = resolve(stem)
    tensors_file, meta_file = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for f in (tensors_file, meta_file):
        if f.exists() and not f.is_file():
            raise BenchError(f"checkpoint file {f} is not a regular file; fix the path in bench.toml")
        if not f.is_file():
            raise BenchError(f"checkpoint file {f} not found; train it with `bench train` or fix the path in bench.toml")
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"checkpoint metadata {meta_file} is not valid UTF-8 JSON ({e})") from None
    except OSError as e:
        raise BenchError(f"cannot read checkpoint metadata {meta_file} ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise BenchError(f"checkpoint metadata {meta_file} must hold a JSON object, got {type(meta).__name__}")
    if kind is not None and meta.get("kind") != kind:
        raise BenchError(f"checkpoint {meta_file} holds a {meta.get('kind')!r} model, expected {kind!r}")
    try:
        state = load_file(str(tensors_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise BenchError(f"checkpoint {tensors_file} is unreadable or truncated ({e})") from None
    return state, meta


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(stem: str | os.PathLike) -> str:
    if str(stem).endswith(".th"):  # an official Unleashing Transformers file (bench.official)
        return file_sha256(stem)
    return file_sha256(resolve(stem).with_suffix(".safetensors"))


def state_mismatches(own: dict, found: dict, prefix: str = "") -> list[str]:
    """Why `found` (name -> anything with .shape) does not fit a module's state dict `own`: missing and
    unexpected keys and wrong shapes, a few of each; empty where it fits."""
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    wrong = [f"{prefix}{k}: file {tuple(found[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in found and tuple(found[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys {[prefix + k for k in missing[:3]]}{'...' if len(missing) > 3 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {[prefix + k for k in unexpected[:3]]}{'...' if len(unexpected) > 3 else ''}")
    if wrong:
        parts.append(f"shape mismatch {wrong[:2]}")
    return parts


def load_state_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict with an error that names the file and the first mismatches."""
    parts = state_mismatches(module.state_dict(), state)
    if parts:
        raise BenchError(f"checkpoint {source} does not fit its model config: " + "; ".join(parts))
    module.load_state_dict(state)
