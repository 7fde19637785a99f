"""The reference cache is keyed by content: same-size replacements change the features, unchanged data
is neither hashed nor decoded again, and an LMDB's values count, not only its keys."""
import io
import json
import os
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

import bench.data as data_module
import bench.protocol as protocol_module
from bench.data import HashCache, LmdbImages, digits_split
from conftest import add_folder_dataset, bench


def _bmp(path, image: np.ndarray) -> None:
    Image.fromarray(image[..., 0]).save(path, format="BMP")  # uncompressed: the size depends on the shape only


def _folder(workdir, train_images, heldout_images):
    train, heldout = workdir / "train", workdir / "heldout"
    for folder, images in ((train, train_images), (heldout, heldout_images)):
        folder.mkdir(exist_ok=True)
        for i, img in enumerate(images):
            _bmp(folder / f"{i:03d}.bmp", img)
    add_folder_dataset(workdir, train, heldout)
    return train


def _run(name):
    code, out = bench("run", "--dataset", "folderdigits", "--samplers", "data", "--run-name", name, "--quiet")
    assert code == 0, out
    return json.loads((Path("results") / "folderdigits" / name / "results.json").read_text())


def test_same_size_replacements_change_the_reference(workdir):
    images = digits_split("train").images
    train = _folder(workdir, images[:30], digits_split("heldout").images[:12])
    first = _run("first")
    stamps = {}
    for i, f in enumerate(sorted(train.iterdir())):
        st = f.stat()
        stamps[f] = (st.st_size, st.st_mtime_ns)
        _bmp(f, images[100 + i])   # another digit, the same number of bytes
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))   # and the old modification time
    assert {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in stamps} == stamps
    second = _run("second")
    assert second["manifest"]["dataset_content"] != first["manifest"]["dataset_content"]
    assert second["manifest"]["reference"]["key"] != first["manifest"]["reference"]["key"]
    assert second["rows"][0]["fid"] != first["rows"][0]["fid"]


def test_a_second_run_on_unchanged_data_reads_no_image(workdir, monkeypatch):
    _folder(workdir, digits_split("train").images[:30], digits_split("heldout").images[:12])
    caches, decoded = [], []

    class CountedHashCache(HashCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    decode = data_module._decode
    monkeypatch.setattr(protocol_module, "HashCache", CountedHashCache)
    monkeypatch.setattr(data_module, "_decode", lambda *a: decoded.append(1) or decode(*a))
    args = ("run", "--dataset", "folderdigits", "--samplers", "absorbing", "--steps", 1, "--num-samples", 8, "--quiet")
    code, out = bench(*args, "--run-name", "a")
    assert code == 0, out
    assert caches[-1].reads == 42 and len(decoded) == 30   # every file hashed, the training split decoded
    decoded.clear()
    code, out = bench(*args, "--run-name", "b")
    assert code == 0, out
    assert caches[-1].reads == 0 and decoded == []


def _lmdb(path, images) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0]).save(buf, format="BMP")
            txn.put(f"{i:04d}".encode(), buf.getvalue())
    env.close()


def _close_lmdb(path) -> None:
    """py-lmdb opens a path once per process: close bench's handle so the test can write the database."""
    _, env = data_module._LMDB_ENVS.pop(str(path.resolve()))
    env.close()


def test_lmdb_values_count_not_only_keys(tmp_path):
    images = digits_split("train").images
    db = tmp_path / "db"
    _lmdb(db, images[:5])
    hashes = HashCache(tmp_path / "hashes.json")
    before = LmdbImages(db, 16, 1).content_id(hashes)
    assert LmdbImages(db, 16, 1).content_id(hashes) == before and hashes.reads == 1  # remembered
    _close_lmdb(db)
    _lmdb(db, images[5:10])   # the same keys, other images of the same size
    assert LmdbImages(db, 16, 1).content_id(hashes) != before and hashes.reads == 2
    _close_lmdb(db)
