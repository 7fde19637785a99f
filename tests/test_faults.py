"""Bad input and faults: every one is refused with one line naming what is wrong (exit 2 through the
CLI), or, where the config asks to tolerate it (on_corrupt = "skip"), survived and counted."""
import errno
import io
import json
import os
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

import bench.checkpoints as checkpoints_module
from bench.checkpoints import WEIGHTS_DIR, atomic_write_text, save_checkpoint
from bench.data import LmdbImages, digits_split
from bench.errors import BenchError
from bench.loading import load_transformer, load_vq
from bench.models import Transformer, TransformerConfig
from bench.samplers import SamplerSettings, generate
from bench.samplers.absorbing import AbsorbingSampler
from conftest import add_folder_dataset, bench

OFFICIAL = Path(__file__).parent / "fixtures" / "official_tiny"


def one_error_line(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def copy_builtin(name: str, dest: Path) -> Path:
    for ext in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / "digits" / f"{name}{ext}", dest / f"{name}{ext}")
    return dest / name


# ----------------------------------------------------------------------------- checkpoints

def test_truncated_harness_checkpoint_names_the_file(tmp_path):
    stem = copy_builtin("vq", tmp_path)
    f = stem.with_suffix(".safetensors")
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    with pytest.raises(BenchError, match="unreadable or truncated") as e:
        load_vq(stem)
    assert str(f) in str(e.value)


def test_checkpoint_disagreeing_with_its_config_names_key_and_shapes(tmp_path):
    stem = copy_builtin("vq", tmp_path)
    meta_file = stem.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta["hparams"]["codebook_size"] = 128
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BenchError) as e:
        load_vq(stem)
    msg = str(e.value)
    assert str(stem) in msg and "quantize.embedding.weight" in msg and "(64, 32)" in msg and "(128, 32)" in msg


def test_prior_of_another_codebook_than_the_tokenizer_is_refused(workdir):
    cfg = TransformerConfig(codebook_size=32, block_size=64, n_layers=1, n_head=1, n_emb=16)
    save_checkpoint(workdir / "prior32", Transformer(cfg).state_dict(), {"kind": "absorbing", "hparams": cfg.__dict__})
    text = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(text.replace('absorbing = "builtin:digits/absorbing"',
                                                     f'absorbing = "{workdir / "prior32"}"', 1))
    code, out = bench("run", "--samplers", "absorbing", "--steps", 1, "--num-samples", 8, "--quiet")
    line = one_error_line(out)
    assert code == 2 and "prior32" in line and "codebook 32" in line and "codebook 64" in line
    assert not files_under(workdir / "results")


class NeedsCode:
    """Stands for anything whose unpickling runs code."""


def test_pickle_needing_code_is_refused(tmp_path):
    state = torch.load(OFFICIAL / "absorbing_ema_1.th", weights_only=True)
    bad = tmp_path / "absorbing_ema_1.th"
    torch.save({**state, "extra": NeedsCode()}, bad)
    hparams = json.loads((OFFICIAL / "hparams.json").read_text())
    with pytest.raises(BenchError, match="trust-checkpoint") as e:
        load_transformer(bad, "absorbing", official_hparams=hparams)
    assert str(bad) in str(e.value) and "NeedsCode" in str(e.value)


# ----------------------------------------------------------------------------- data

def _digit_pngs(folder: Path, n: int, split: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(digits_split(split).images[:n]):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("on_corrupt", ["skip", "error"])
def test_corrupt_image_in_a_folder_is_skipped_and_counted_or_an_error(workdir, on_corrupt):
    train, heldout = workdir / "train", workdir / "heldout"
    _digit_pngs(train, 30, "train")
    _digit_pngs(heldout, 12, "heldout")
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (heldout / "cut.png").write_bytes((heldout / "000.png").read_bytes()[:40])
    add_folder_dataset(workdir, train, heldout)
    with open(workdir / "bench.toml") as f:
        text = f.read()
    (workdir / "bench.toml").write_text(text.replace('kind = "folder"', f'kind = "folder"\non_corrupt = "{on_corrupt}"'))
    code, out = bench("run", "--dataset", "folderdigits", "--samplers", "data", "--run-name", "c", "--quiet")
    if on_corrupt == "error":
        assert code == 2 and "broken.png" in one_error_line(out)
        assert not files_under(workdir / "results")
        return
    assert code == 0, out
    data = json.loads((workdir / "results" / "folderdigits" / "c" / "results.json").read_text())
    assert data["manifest"]["skipped"] == {"train": 1, "heldout": 1}
    assert data["rows"][0]["n_samples"] == 12
    manifest = json.loads((workdir / "results" / "folderdigits" / "c" / "manifest.json").read_text())
    assert manifest["skipped"] == {"train": 1, "heldout": 1}


def test_lmdb_with_a_bad_record(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, img in enumerate(digits_split("heldout").images[:3]):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0]).save(buf, format="PNG")
            txn.put(f"{i:04d}".encode(), buf.getvalue())
        txn.put(b"0009", b"\x89PNG\r\n\x1a\n truncated record")
    env.close()
    ds = LmdbImages(tmp_path / "db", 16, channels=1)
    with pytest.raises(BenchError, match="'0009'") as e:
        [ds[i] for i in range(len(ds))]
    assert str(tmp_path / "db") in str(e.value) and "on_corrupt" in str(e.value)
    ds = LmdbImages(tmp_path / "db", 16, channels=1, on_corrupt="skip")
    assert len(ds) == 3 and ds.skipped == [b"0009"]
    assert all(ds[i].shape == (16, 16, 1) for i in range(3))


# ----------------------------------------------------------------------------- writing results

def _full_disk_under(monkeypatch, root: Path):
    """os.replace (the last step of every atomic write) fails with ENOSPC for paths under root."""
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).resolve().is_relative_to(root.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **kw)
    monkeypatch.setattr(checkpoints_module.os, "replace", replace)


def test_full_disk_is_one_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    _full_disk_under(monkeypatch, tmp_path)
    target = tmp_path / "out" / "rows.json"
    with pytest.raises(BenchError, match="disk full") as e:
        atomic_write_text(target, "x" * 10000)
    assert str(target) in str(e.value)
    assert not files_under(tmp_path)


def test_full_disk_during_a_run_exits_2_naming_the_file(workdir, monkeypatch):
    _full_disk_under(monkeypatch, workdir / "results")
    code, out = bench("run", "--samplers", "absorbing", "--steps", 1, "--num-samples", 8, "--run-name", "full",
                      "--quiet")
    line = one_error_line(out)
    assert code == 2 and "disk full" in line and str(workdir / "results" / "digits" / "full") in line
    assert not files_under(workdir / "results")  # neither half-written files nor temporary ones


# ----------------------------------------------------------------------------- sampling

def test_n_not_divisible_by_the_batch_size(workdir):
    from bench.loading import load_transformer as lt
    prior, _ = lt("builtin:digits/absorbing", "absorbing")
    sampler = AbsorbingSampler(prior)
    settings = SamplerSettings("absorbing", 2, 1.0)
    tokens = generate(sampler, settings, 0, range(37), 10, progress=False)
    assert tokens.shape == (37, 64)
    assert np.array_equal(tokens, generate(sampler, settings, 0, range(37), 37, progress=False))
    text = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(text.replace("batch_size = 250", "batch_size = 10", 1))
    code, out = bench("run", "--samplers", "absorbing", "--steps", 2, "--num-samples", 37, "--run-name", "odd",
                      "--quiet")
    assert code == 0, out
    rows = json.loads((workdir / "results" / "digits" / "odd" / "results.json").read_text())["rows"]
    assert [r["n_samples"] for r in rows] == [37] * len(rows) and len(rows) == 3  # absorbing at t = 1, 0.8, 0.9


class NanDenoiser(Transformer):
    def project(self, hidden):
        return torch.full((*hidden.shape[:-1], self.cfg.codebook_size), float("nan"))


def test_nan_logits_are_an_error_never_a_sample(workdir, monkeypatch):
    cfg = TransformerConfig(codebook_size=8, block_size=4, n_layers=1, n_head=1, n_emb=8)
    sampler = AbsorbingSampler(NanDenoiser(cfg))
    with pytest.raises(BenchError, match="NaN"):
        generate(sampler, SamplerSettings("absorbing", 2, 1.0), 0, range(3), 2, progress=False)
    # through a run: the shipped prior made to return NaN; one line, exit 2, nothing written
    monkeypatch.setattr(Transformer, "project", NanDenoiser.project)
    code, out = bench("run", "--samplers", "absorbing", "--steps", 1, "--num-samples", 8, "--quiet")
    assert code == 2 and "NaN" in one_error_line(out)
    assert not files_under(workdir / "results")
