"""A Taming release beside a harness prior in one run: each row decoded by its own tokenizer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.checkpoints import save_checkpoint
from bench.models import Transformer, TransformerConfig, VQAutoEncoder, VQConfig
from conftest import bench

RELEASE = Path(__file__).parent / "fixtures" / "taming_tiny" / "release"


@pytest.fixture
def side_by_side(workdir):
    """A folder of 16 px RGB images, a random harness VQ and absorbing prior for it, and the tiny
    Taming release (its own 16 px RGB first stage, 32 codes)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("heldout", 12)):
        (workdir / split).mkdir()
        for i in range(n):
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            Image.fromarray(base).resize((16, 16), Image.BILINEAR).save(workdir / split / f"{i:03d}.png")
    torch.manual_seed(0)
    vq_cfg = VQConfig(img_size=16, n_channels=3, nf=32, ch_mult=[1, 2], codebook_size=16, emb_dim=8)
    save_checkpoint(workdir / "vq", VQAutoEncoder(vq_cfg).state_dict(),
                    {"kind": "vq", "hparams": vq_cfg.__dict__})
    den_cfg = TransformerConfig(codebook_size=16, block_size=64, n_layers=1, n_head=2, n_emb=16)
    save_checkpoint(workdir / "absorbing", Transformer(den_cfg).state_dict(),
                    {"kind": "absorbing", "hparams": den_cfg.__dict__})
    with open(workdir / "bench.toml", "a") as f:
        f.write(f"""
[datasets.pair]
kind = "folder"
train = "{workdir / 'train'}"
heldout = "{workdir / 'heldout'}"
resolution = 16
channels = 3
extractor = "digits"
num_samples = 12
batch_size = 6
tokenizer = "{workdir / 'vq'}"
priors = {{ absorbing = "{workdir / 'absorbing'}", taming = "{RELEASE}" }}
metrics = {{ dc_k = 3 }}

[[datasets.pair.sweep]]
sampler = "absorbing"
steps = [2]

[[datasets.pair.sweep]]
sampler = "taming"
top_k = 20
top_p = 1.0
""")
    return workdir


def test_absorbing_and_taming_rows_side_by_side(side_by_side):
    code, out = bench("run", "--dataset", "pair", "--run-name", "pair", "--quiet")
    assert code == 0, out
    data = json.loads((side_by_side / "results" / "pair" / "pair" / "results.json").read_text())
    by = {r["slug"]: r for r in data["rows"]}
    assert list(by) == ["data", "reconstruction", "reconstruction-taming", "random-codes", "absorbing-s2-t1",
                        "taming-t1-k20-p1"]
    vq = str(side_by_side / "vq")
    assert by["absorbing-s2-t1"]["tokenizer"] == by["reconstruction"]["tokenizer"] == by["random-codes"]["tokenizer"] == vq
    assert by["taming-t1-k20-p1"]["tokenizer"] == by["reconstruction-taming"]["tokenizer"] == "taming:release"
    assert "data" in by and by["data"].get("tokenizer") is None
    assert by["taming-t1-k20-p1"]["nfe"] == 64 and "Taming" in by["taming-t1-k20-p1"]["execution"]
    assert data["manifest"]["hashes"]["taming"]
    for r in data["rows"]:
        assert np.isfinite(r["fid"]) and r["fid_ci_low"] <= r["fid"] <= r["fid_ci_high"]


def test_sample_command_with_a_taming_release(side_by_side):
    out_file = side_by_side / "taming.npz"
    code, out = bench("sample", "--dataset", "pair", "--sampler", "taming", "--temperature", 0, "--top-k", 5,
                      "--num", 3, "--out", out_file)
    assert code == 0, out
    with np.load(out_file) as z:
        assert z["tokens"].shape == (3, 8, 8) and z["images"].shape == (3, 16, 16, 3) and z["images"].dtype == np.uint8
        assert str(z["tokenizer"]) == "taming:release"
        greedy = z["tokens"]
    assert (greedy == greedy[0]).all()  # temperature 0: argmax, the same for every sample


def test_a_tokenizer_of_another_resolution_is_refused(side_by_side):
    text = (side_by_side / "bench.toml").read_text()
    (side_by_side / "bench.toml").write_text(text.replace('tokenizer = "' + str(side_by_side / "vq") + '"',
                                                          'tokenizer = "builtin:digits/vq"'))
    code, out = bench("run", "--dataset", "pair", "--run-name", "bad", "--quiet")
    assert code == 2 and "is for 16px x 1 channels, dataset pair is 16px x 3" in out
    assert not (side_by_side / "results" / "pair").exists()
