import io
import pickle

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from bench.data import (
    DATASET_KINDS, ArrayImages, DigitsSource, FileSource, FolderImages, LmdbImages, digits_labels, digits_split,
    iterate_batches,
)
from bench.errors import BenchError

R = 8


def random_image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def reference(image, resolution=R, mode="RGB"):
    """What the paper's code computes: Resize (shorter side) then CenterCrop, straight from torchvision."""
    t = transforms.Compose([transforms.Resize(resolution), transforms.CenterCrop(resolution)])
    x = np.asarray(t(image.convert(mode)))
    return x[:, :, None] if x.ndim == 2 else x


def encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    random_image(20, 12, 0).save(root / "b" / "deep" / "wide.png")
    random_image(10, 30, 1).save(root / "a" / "tall.jpg", quality=90)
    random_image(16, 16, 2, "L").save(root / "c.PNG")  # upper-case extension, greyscale source
    random_image(9, 9, 3).save(root / "a" / "small.jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_order_shapes_and_preprocessing(folder):
    ds = FolderImages(folder, R)
    rel = [p.relative_to(folder).as_posix() for p in ds.files]
    assert rel == ["a/small.jpeg", "a/tall.jpg", "b/deep/wide.png", "c.PNG"]
    assert len(ds) == 4 and ds.resolution == R and ds.channels == 3 and ds.skipped == []
    for i, path in enumerate(ds.files):
        x = ds[i]
        assert x.dtype == np.uint8 and x.shape == (R, R, 3)
        np.testing.assert_array_equal(x, reference(Image.open(path)))


def test_folder_greyscale(folder):
    ds = FolderImages(folder, R, channels=1)
    x = ds[1]
    assert x.shape == (R, R, 1) and ds.channels == 1
    np.testing.assert_array_equal(x, reference(Image.open(ds.files[1]), mode="L"))


def test_folder_content_id(folder):
    a = FolderImages(folder, R).content_id()
    assert a == FolderImages(folder, R).content_id()
    assert a != FolderImages(folder, R * 2).content_id()
    random_image(5, 5, 9).save(folder / "z.png")
    assert a != FolderImages(folder, R).content_id()


def test_folder_errors(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        FolderImages(tmp_path / "nope", R)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(BenchError, match="not a directory"):
        FolderImages(tmp_path / "file.png", R)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(BenchError, match="holds no images"):
        FolderImages(tmp_path / "empty", R)
    (tmp_path / "ok").mkdir()
    random_image(4, 4, 0).save(tmp_path / "ok" / "a.png")
    with pytest.raises(BenchError, match="on_corrupt"):
        FolderImages(tmp_path / "ok", R, on_corrupt="ignore")
    with pytest.raises(BenchError, match="channels"):
        FolderImages(tmp_path / "ok", R, channels=4)


def test_folder_corrupt(folder):
    (folder / "a" / "broken.png").write_bytes(b"definitely not a png")
    truncated = encode(random_image(40, 40, 5), "JPEG")
    (folder / "b" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])

    ds = FolderImages(folder, R)  # "error": no up-front scan, so the bad files are listed
    assert len(ds) == 6
    names = [p.name for p in ds.files]
    with pytest.raises(BenchError, match="broken.png"):
        ds[names.index("broken.png")]
    with pytest.raises(BenchError, match="truncated.jpg"):
        ds[names.index("truncated.jpg")]

    ds = FolderImages(folder, R, on_corrupt="skip")
    assert len(ds) == 4
    assert sorted(p.name for p in ds.skipped) == ["broken.png", "truncated.jpg"]
    assert sorted(p.name for p in ds.verify(progress=False)) == []
    assert all(ds[i].shape == (R, R, 3) for i in range(len(ds)))


def write_lmdb(path, records, subdir=True):
    env = lmdb.open(str(path), map_size=1 << 24, subdir=subdir)
    with env.begin(write=True) as txn:
        for k, v in records.items():
            txn.put(k, v)
    env.close()


@pytest.fixture
def lmdb_records():
    images = {
        b"0003": random_image(24, 16, 10),
        b"0001": random_image(16, 24, 11),
        b"0002": random_image(12, 12, 12),
    }
    records = {
        b"0003": encode(images[b"0003"], "WEBP", quality=80),
        b"0001": encode(images[b"0001"], "JPEG", quality=90),
        b"0002": encode(images[b"0002"], "PNG"),
    }
    return records


@pytest.mark.parametrize("subdir", [True, False])
def test_lmdb_loads(tmp_path, lmdb_records, subdir):
    path = tmp_path / ("db" if subdir else "db.mdb")
    write_lmdb(path, lmdb_records, subdir)
    ds = LmdbImages(path, R)
    assert ds.keys == [b"0001", b"0002", b"0003"]
    assert len(ds) == 3 and ds.resolution == R and ds.channels == 3 and ds.entries == 3
    for i, key in enumerate(ds.keys):
        x = ds[i]
        assert x.dtype == np.uint8 and x.shape == (R, R, 3)
        np.testing.assert_array_equal(x, reference(Image.open(io.BytesIO(lmdb_records[key]))))
    grey = LmdbImages(path, R, channels=1)
    assert grey[0].shape == (R, R, 1)
    assert ds.content_id() == LmdbImages(path, R).content_id() != LmdbImages(path, 2 * R).content_id()


def test_lmdb_shared_pickled_and_forked(tmp_path, lmdb_records):
    write_lmdb(tmp_path / "db", lmdb_records)
    ds = LmdbImages(tmp_path / "db", R)
    first = ds[0]
    other = LmdbImages(tmp_path / "db", 2 * R)  # same files opened twice in one process
    assert other[0].shape == (2 * R, 2 * R, 3)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds))[0], first)
    # forked workers after the parent has read: each must open its own environment
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    batches = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(batches, np.stack([ds[i] for i in range(len(ds))]))
    np.testing.assert_array_equal(ds[0], first)


def test_lmdb_bad_record(tmp_path, lmdb_records):
    write_lmdb(tmp_path / "db", {**lmdb_records, b"0002": b"garbage bytes"})
    ds = LmdbImages(tmp_path / "db", R)
    ds[0]
    with pytest.raises(BenchError, match="'0002'"):
        ds[1]
    ds = LmdbImages(tmp_path / "db", R, on_corrupt="skip")
    assert ds.keys == [b"0001", b"0003"] and ds.skipped == [b"0002"]


def test_lmdb_errors(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        LmdbImages(tmp_path / "nope", R)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BenchError, match="not an LMDB"):
        LmdbImages(tmp_path / "plain", R)
    (tmp_path / "junk.mdb").write_bytes(b"x" * 5000)
    with pytest.raises(BenchError, match="not an LMDB"):
        LmdbImages(tmp_path / "junk.mdb", R)
    write_lmdb(tmp_path / "empty", {})
    with pytest.raises(BenchError, match="no records"):
        LmdbImages(tmp_path / "empty", R)


def test_digits_split():
    train, heldout = digits_split("train"), digits_split("heldout")
    assert len(train) == 1297 and len(heldout) == 500
    for ds in (train, heldout):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (16, 16, 1)
        assert ds.images.min() == 0 and ds.images.max() == 255
    rows = lambda ds: {x.tobytes() for x in ds.images}
    assert len(rows(train)) == 1297 and not rows(train) & rows(heldout)
    again = digits_split("train")
    assert again.content_id() == train.content_id()
    np.testing.assert_array_equal(again.images, train.images)
    assert digits_split("train", split_seed=1).content_id() != train.content_id()
    assert len(digits_labels("heldout")) == 500
    with pytest.raises(BenchError, match="split"):
        digits_split("test")


def test_sources(tmp_path, folder, lmdb_records):
    assert set(DATASET_KINDS) == {"digits", "folder", "lsun"}
    assert len(DigitsSource(16, 1, heldout_size=100).open("heldout")) == 100
    assert len(FileSource(R, 3, str(folder)).open("train")) == 4
    write_lmdb(tmp_path / "db", lmdb_records)
    assert FileSource(R, 3, str(tmp_path / "db"), kind="lsun").open("train")[0].shape == (R, R, 3)
    with pytest.raises(BenchError, match="datasets.x.heldout is not set"):
        FileSource(R, 3, str(folder), key="datasets.x").open("heldout")

    assert "present, 4 image files" in FileSource(R, 3, str(folder)).describe()["train"]
    assert "missing" in FileSource(R, 3, str(tmp_path / "nope")).describe()["train"]
    assert "3 records" in FileSource(R, 3, str(tmp_path / "db"), kind="lsun").describe()["train"]
    assert "not an LMDB" in FileSource(R, 3, str(folder), kind="lsun").describe()["train"]
    assert "embedded" in DigitsSource(16, 1).describe()["data"]


def test_iterate_batches(folder):
    arr = ArrayImages(np.arange(7 * 2 * 2 * 1, dtype=np.uint8).reshape(7, 2, 2, 1), "x")
    sizes = [len(b) for b in iterate_batches(arr, 3)]
    assert sizes == [3, 3, 1]
    batches = list(iterate_batches(arr, 2, limit=5))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), arr.images[:5])
    assert [len(b) for b in iterate_batches(arr, 4, limit=100)] == [4, 3]

    ds = FolderImages(folder, R)
    batches = list(iterate_batches(ds, 3))
    assert [b.shape for b in batches] == [(3, R, R, 3), (1, R, R, 3)]
    assert batches[0].dtype == np.uint8
    np.testing.assert_array_equal(batches[1][0], ds[3])
