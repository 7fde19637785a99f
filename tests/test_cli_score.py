"""`bench features` and `bench score`: feature files from image folders, metrics from two files."""
import json

import numpy as np
import pytest
from PIL import Image

from bench import features, metrics
from bench.data import digits_split
from conftest import bench


def png_folder(path, images):
    """Grey PNGs, some in a subfolder, named so that sorted order is the array order."""
    for i, im in enumerate(images):
        target = path / ("b" if i % 2 else "a") / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im[:, :, 0]).save(target)
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*.png"))


@pytest.fixture(scope="module")
def digit_images():
    return digits_split("heldout").images[:40], digits_split("train").images[:50]


def test_features_and_score_round_trip(workdir, digit_images):
    real_images, fake_images = digit_images
    real_files = png_folder(workdir / "real", real_images)
    png_folder(workdir / "fake", fake_images)
    for name in ("real", "fake"):
        code, out = bench("features", workdir / name, "--extractor", "digits", "--out", workdir / f"{name}.npz", "--quiet")
        assert code == 0, out

    ext = features.load_extractor("digits")
    with np.load(workdir / "real.npz", allow_pickle=False) as f:
        assert f["features"].shape == (40, 128) and f["features"].dtype == np.float64
        assert list(f["files"]) == real_files
        assert str(f["extractor"]) == "digits" and str(f["weights_sha256"]) == ext.weights_sha256
        assert int(f["resolution"]) == 16 and int(f["channels"]) == 3
        order = [int(p.split("/")[1][:3]) for p in real_files]
        # grey PNGs decoded as RGB: the digits extractor averages identical channels
        np.testing.assert_allclose(f["features"], ext(real_images[order]), rtol=0, atol=1e-5)
        real_feats = f["features"]
    with np.load(workdir / "fake.npz", allow_pickle=False) as f:
        fake_feats = f["features"]

    code, out = bench("score", workdir / "real.npz", workdir / "fake.npz", "--json", "--memorisation")
    assert code == 0, out
    result = json.loads(out)
    assert (result["n_real"], result["n_fake"], result["extractor"]) == (40, 50, "digits")
    assert result["fid"] == metrics.fid(fake_feats, real_feats)
    expected = metrics.compute_metrics(fake_feats, real_feats, {"memorisation": True})
    for key in ("fid", "precision", "recall", "density", "coverage", "kid_mean", "memorisation"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key

    code, out = bench("score", workdir / "real.npz", workdir / "fake.npz")
    assert code == 0 and "fid" in out and "coverage" in out and "memorisation" not in out

    code, out = bench("score", workdir / "real.npz", workdir / "fake.npz", "--json", "--cleanfid")
    assert code == 0, out
    result = json.loads(out)
    assert result["fid_cleanfid"] == pytest.approx(result["fid"], rel=1e-6)


def test_score_refuses_mismatched_files(workdir):
    rng = np.random.default_rng(0)
    np.savez(workdir / "a.npz", features=rng.normal(size=(20, 4)), extractor="digits", weights_sha256="aa")
    np.savez(workdir / "b.npz", features=rng.normal(size=(20, 4)), extractor="inception-v3-compat", weights_sha256="aa")
    np.savez(workdir / "c.npz", features=rng.normal(size=(20, 4)), extractor="digits", weights_sha256="bb")
    np.savez(workdir / "d.npz", features=rng.normal(size=(20, 4)))
    (workdir / "e.npz").write_bytes(b"not a zip")
    for other, message in (("b.npz", "same extractor"), ("c.npz", "different 'digits' weights"),
                           ("d.npz", "lacks extractor, weights_sha256"), ("e.npz", "not a readable"),
                           ("missing.npz", "not found")):
        code, out = bench("score", workdir / "a.npz", workdir / other)
        assert code == 2 and message in out, (other, out)


def test_features_bad_input(workdir):
    code, out = bench("features", workdir / "nowhere", "--extractor", "digits", "--out", workdir / "x.npz")
    assert code == 2 and "does not exist" in out
    (workdir / "empty").mkdir()
    code, out = bench("features", workdir / "empty", "--extractor", "nope", "--out", workdir / "x.npz")
    assert code == 2 and "unknown feature extractor" in out
    assert not (workdir / "x.npz").exists()
