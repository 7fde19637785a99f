import importlib
import json

import numpy as np
import pytest
import torch
import torch_fidelity

from bench import features, metrics
from bench.checkpoints import checkpoint_sha256, file_sha256, resolve
from bench.data import digits_labels, digits_split, iterate_batches
from bench.errors import BenchError


@pytest.fixture(scope="module")
def ext():
    return features.load_extractor("digits")


@pytest.fixture(scope="module")
def heldout():
    return digits_split("heldout").images


def test_shipped_weights_load(ext):
    stem = resolve(features.DIGITS_STEM)
    assert stem.with_suffix(".safetensors").is_file() and stem.with_suffix(".json").is_file()
    assert ext.name == "digits" and ext.dim == 128
    assert ext.weights_sha256 == checkpoint_sha256(features.DIGITS_STEM) == file_sha256(stem.with_suffix(".safetensors"))


def test_dims_and_determinism(ext, heldout):
    a = ext(heldout[:64])
    assert a.shape == (64, 128) and a.dtype == np.float64 and np.isfinite(a).all()
    assert np.array_equal(a, ext(heldout[:64]))
    assert np.array_equal(a, ext(torch.from_numpy(heldout[:64])))


def test_batch_size_independent(ext, heldout):
    rows = range(0, 64, 4)  # single-image calls are slow when another process holds a core
    one = np.concatenate([ext(heldout[i:i + 1]) for i in rows])
    np.testing.assert_allclose(one, ext(heldout[:64])[list(rows)], rtol=0, atol=1e-5)


def test_rgb_input_averages_channels(ext, heldout):
    rgb = np.repeat(heldout[:32], 3, axis=3)
    np.testing.assert_allclose(ext(rgb), ext(heldout[:32]), rtol=0, atol=1e-5)


def test_extract_features_stream(ext, heldout):
    out = features.extract_features(ext, iterate_batches(heldout, 50, limit=120), total=120, progress=False)
    assert out.shape == (120, 128)
    np.testing.assert_allclose(out, ext(heldout[:120]), rtol=0, atol=1e-5)
    assert features.extract_features(ext, [], progress=False).shape == (0, 128)


def test_input_checks(ext, heldout):
    with pytest.raises(BenchError, match="uint8"):
        ext(heldout[:4].astype(np.float32) / 255)
    with pytest.raises(BenchError, match="C in \\(1, 3\\)"):
        ext(np.zeros((2, 16, 16, 2), np.uint8))
    with pytest.raises(BenchError, match="H = W = 16"):
        ext(np.zeros((2, 32, 32, 1), np.uint8))
    with pytest.raises(BenchError, match="H = W = 16"):
        ext(np.zeros((16, 16, 1), np.uint8))
    with pytest.raises(BenchError, match="known: .*digits"):
        features.load_extractor("nope")


def test_heldout_accuracy_matches_json(heldout):
    model, meta = features.load_digits_net()
    acc = features.classifier_accuracy(model, heldout, digits_labels("heldout"))
    assert acc == pytest.approx(meta["heldout_accuracy"], abs=1e-9)
    assert acc >= 0.97
    stored = json.loads(resolve(features.DIGITS_STEM).with_suffix(".json").read_text())
    assert stored["kind"] == "extractor" and stored["train"]["seed"] == 0


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) tensor as the Dataset torch-fidelity takes."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_torch_fidelity_registration_and_fid(ext, heldout):
    importlib.reload(features)  # registering twice must not fail
    assert "bench-digits" in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    train = digits_split("train").images[:400]
    # input1 as RGB, the way torch-fidelity reads image files; input2 single-channel
    x1 = torch.from_numpy(np.repeat(heldout, 3, axis=3)).permute(0, 3, 1, 2).contiguous()
    x2 = torch.from_numpy(train).permute(0, 3, 1, 2).contiguous()
    out = torch_fidelity.calculate_metrics(
        input1=TensorImages(x1), input2=TensorImages(x2), feature_extractor="bench-digits", fid=True,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=100)
    ours = metrics.fid(ext(heldout), ext(train))
    assert ours > 0
    assert out["frechet_inception_distance"] == pytest.approx(ours, rel=1e-3)
