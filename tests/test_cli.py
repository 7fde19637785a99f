"""The command line end to end: a small run, its files, and bad input (exit 2, nothing written)."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from bench.data import digits_split
from bench.results import SCHEMA
from conftest import add_folder_dataset, bench


SMALL_RUN = ("run", "--num-samples", 40, "--steps", "1,4", "--quiet")


@pytest.mark.slow
def test_small_run_writes_a_finished_run(workdir):
    code, out = bench(*SMALL_RUN, "--run-name", "small")
    assert code == 0, out
    run = workdir / "results" / "digits" / "small"
    data = json.loads((run / "results.json").read_text())
    slugs = [r["slug"] for r in data["rows"]]
    assert slugs == ["data", "reconstruction", "random-codes", "absorbing-s1-t1", "absorbing-s4-t1",
                     "absorbing-s1-t0.8", "absorbing-s4-t0.8", "absorbing-s1-t0.9", "absorbing-s4-t0.9",
                     "autoregressive-t0.8", "autoregressive-t0.9", "autoregressive-t1", "maskgit-s1-t1", "maskgit-s4-t1"]
    by_slug = {r["slug"]: r for r in data["rows"]}
    assert by_slug["absorbing-s4-t1"]["switches"] == "skip-idle+head-where-drawn"  # digits' execution
    # throughput is timed once per configuration up to the temperature
    assert by_slug["absorbing-s4-t0.8"]["timed_with"] == "absorbing-s4-t1" and by_slug["absorbing-s4-t1"].get("timed_with") is None
    assert by_slug["absorbing-s4-t0.8"]["img_per_s"] == by_slug["absorbing-s4-t1"]["img_per_s"]
    assert by_slug["autoregressive-t1"]["timed_with"] == "autoregressive-t0.8"
    assert "key/value cache" in by_slug["autoregressive-t1"]["execution"]
    assert "MaskGIT" in by_slug["maskgit-s4-t1"]["execution"]
    assert 0 <= by_slug["absorbing-s4-t1"]["memorisation"] <= 1
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == SCHEMA
    by = {r["sampler"] + r["steps"]: r for r in rows}
    assert by["absorbing4"]["n_samples"] == "40" and by["data"]["n_samples"] == "500"
    assert by["data"]["img_per_s"] == "" and float(by["absorbing4"]["img_per_s"]) > 0
    assert by["absorbing4"]["nfe"] == "4" and by["random-codes"]["nfe"] == "0"
    for r in rows:
        assert float(r["fid"]) >= 0
    assert float(by["absorbing4"]["fid"]) < float(by["random-codes"]["fid"])
    m = data["manifest"]
    assert m["num_samples"] == 40 and m["hashes"]["absorbing"] and m["versions"]["torch"]
    for f in ("results.md", "fid_vs_steps.png", "img_per_s_vs_steps.png", "samples/absorbing-s4-t1.png",
              "samples/data.png", "manifest.json"):
        assert (run / f).is_file(), f

    # a finished run is never overwritten silently
    code, out = bench(*SMALL_RUN, "--run-name", "small")
    assert code == 2 and "--force" in out

    # an interrupted run resumes: finished rows are kept, missing ones recomputed identically
    (run / "results.json").unlink()
    (run / "rows" / "absorbing-s4-t1.json").unlink()
    kept = (run / "rows" / "absorbing-s1-t1.json").read_text()
    code, out = bench(*SMALL_RUN, "--run-name", "small", "--resume")
    assert code == 0, out
    again = json.loads((run / "results.json").read_text())["rows"]
    assert (run / "rows" / "absorbing-s1-t1.json").read_text() == kept
    for a, b in zip(again, data["rows"]):
        for k in ("fid", "kid_mean", "precision", "recall", "density", "coverage"):
            assert a[k] == pytest.approx(b[k], rel=1e-9), (a["slug"], k)


def test_sample_command_writes_tokens_and_images(workdir):
    code, out = bench("sample", "--sampler", "absorbing", "--steps", 4, "--num", 5, "--out", workdir / "s.npz")
    assert code == 0, out
    f = np.load(workdir / "s.npz")
    assert f["tokens"].shape == (5, 8, 8) and f["tokens"].dtype == np.int64
    assert f["images"].shape == (5, 16, 16, 1) and f["images"].dtype == np.uint8
    # the same seed and indices give the same tokens, whatever the batch size
    code, _ = bench("sample", "--sampler", "absorbing", "--steps", 4, "--num", 3, "--first-index", 2,
                    "--batch-size", 2, "--out", workdir / "t.npz")
    assert code == 0 and np.array_equal(np.load(workdir / "t.npz")["tokens"], f["tokens"][2:])


def _results_written(workdir):
    return (workdir / "results").exists() and any((workdir / "results").rglob("*"))


def _write_digit_pngs(folder, n, split):
    folder.mkdir(parents=True, exist_ok=True)
    images = digits_split(split).images[:n]
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt"])
def test_bad_dataset_gives_one_line_exit_2_and_nothing_written(workdir, case):
    train, heldout = workdir / "train", workdir / "heldout"
    _write_digit_pngs(heldout, 20, "heldout")
    if case == "empty":
        train.mkdir()
    elif case == "corrupt":
        _write_digit_pngs(train, 30, "train")
        (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    add_folder_dataset(workdir, train, heldout)
    code, out = bench("run", "--dataset", "folderdigits", "--quiet")
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    expected = {"missing": str(train), "empty": str(train), "corrupt": "broken.png"}[case]
    assert expected in lines[0]
    assert not _results_written(workdir)


@pytest.mark.slow
def test_folder_dataset_runs_through_the_same_path(workdir):
    train, heldout = workdir / "train", workdir / "heldout"
    _write_digit_pngs(train, 60, "train")
    _write_digit_pngs(heldout, 30, "heldout")
    add_folder_dataset(workdir, train, heldout)
    code, out = bench("run", "--dataset", "folderdigits", "--quiet", "--run-name", "f")
    assert code == 0, out
    rows = json.loads((workdir / "results" / "folderdigits" / "f" / "results.json").read_text())["rows"]
    assert [r["n_samples"] for r in rows] == [30, 30, 40, 40]


def test_unknown_dataset_and_malformed_config(workdir):
    code, out = bench("run", "--dataset", "cifar10", "--quiet")
    assert code == 2 and "unknown dataset 'cifar10'" in out and "digits" in out
    (workdir / "bench.toml").write_text("[run\n")
    code, out = bench("run", "--quiet")
    assert code == 2 and "not valid TOML" in out and len(out.strip().splitlines()) == 1
    assert not _results_written(workdir)


def test_usage_errors_exit_2(workdir):
    assert bench("run", "--steps", "1,x")[0] == 2
    assert bench("run", "--num-samples", 0)[0] == 2
    code, out = bench("run", "--samplers", "diffusion", "--quiet")
    assert code == 2 and "not in the sweep" in out


def test_perf_writes_timing_rows(workdir):
    code, out = bench("perf", "--samplers", "absorbing,autoregressive", "--steps", "2", "--batch-size", 4,
                      "--execution", "plain", "--execution", "skip-idle+head-where-drawn",
                      "--warmup", 0, "--repeats", 1, "--out", workdir / "perf")
    assert code == 0, out
    result = json.loads((workdir / "perf" / "results.json").read_text())
    rows = {(r["label"], r["switches"]): r for r in result["rows"]}
    # autoregressive has no use for either switch: its second row runs (and says it runs) plain
    assert set(rows) == {("absorbing, 2 steps, t=1", "plain"), ("absorbing, 2 steps, t=1", "skip-idle+head-where-drawn"),
                         ("autoregressive, t=1", "plain")}
    absorbing = rows["absorbing, 2 steps, t=1", "plain"]
    assert absorbing["nfe"] == 2 and absorbing["img_per_s"] > 0 and 0 < absorbing["mfu"]
    assert absorbing["passes_per_image"] == 2 and absorbing["speedup_vs_plain"] == 1
    assert absorbing["features_s_per_batch"] > 0 and absorbing["end_to_end_img_per_s"] < absorbing["sampling_img_per_s"]
    assert result["features"] == "features: digits"
    # analytic FLOPs: 2 full passes of 64 tokens through 4 layers of width 96, plus the head
    d, L, V = 96, 64, 64
    per_token = 4 * (24 * d * d + 4 * L * d) + 2 * d * V
    assert absorbing["flops_per_image"] == 2 * L * per_token
    fast = rows["absorbing, 2 steps, t=1", "skip-idle+head-where-drawn"]
    assert fast["passes_per_image"] <= 2 and fast["speedup_vs_plain"] > 0 and fast["dtype"] == "float32"
    assert fast["flops_per_image"] == fast["passes_per_image"] * L * per_token
    with open(workdir / "perf" / "results.csv") as f:
        assert next(csv.reader(f))[:len(SCHEMA)] == SCHEMA
