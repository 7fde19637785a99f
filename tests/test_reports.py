"""bench figures / compare / check on stored runs, and a degraded sampler caught by the check."""
import hashlib
import json

import pytest

from bench.samplers.absorbing import AbsorbingSampler
from bench.samplers import SamplerSettings
from conftest import bench

RUN = ("run", "--num-samples", 40, "--steps", "4", "--samplers", "random-codes,absorbing", "--quiet")


def set_thresholds(workdir, text):
    toml = (workdir / "bench.toml").read_text()
    start = toml.index("[thresholds.digits]")
    end = toml.index("# ---", start)
    (workdir / "bench.toml").write_text(toml[:start] + "[thresholds.digits]\n" + text + "\n" + toml[end:])


@pytest.fixture
def baseline(workdir):
    code, out = bench(*RUN, "--run-name", "baseline")
    assert code == 0, out
    return workdir / "results" / "digits" / "baseline"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_figures_rebuild_identically_from_stored_rows(baseline):
    files = ["results.md", "fid_vs_steps.png", "img_per_s_vs_steps.png", "fid_vs_seconds_per_image.png",
             "samples.png", "tables/fid_vs_steps.md", "tables/fid_vs_steps.tex", "tables/prdc.csv",
             "tables/fid_per_sampler.md"]
    before = {f: digest(baseline / f) for f in files}
    for f in files:
        (baseline / f).unlink()
    code, out = bench("figures", baseline)
    assert code == 0, out
    assert {f: digest(baseline / f) for f in files} == before
    table = (baseline / "tables" / "fid_vs_steps.md").read_text()
    assert "| dataset | sampler | 4 |" in table and "absorbing, t=1" in table
    assert r"\toprule" in (baseline / "tables" / "prdc.tex").read_text()


def test_check_passes_on_the_same_code_and_fails_on_a_degraded_sampler(workdir, monkeypatch):
    # throughput is judged in test_throughput_is_judged_only_on_the_same_device (timing here is noisy);
    # enough samples that a real regression is significant, another seed is not
    run = ("run", "--num-samples", 200, "--steps", "4", "--samplers", "absorbing", "--quiet")
    set_thresholds(workdir, 'fid_ceiling = { "absorbing-s4-t1" = 1000.0 }\nfid_regression = 0.25')
    assert bench(*run, "--run-name", "baseline")[0] == 0
    code, out = bench(*run, "--run-name", "same", "--seeds", "1")
    assert code == 0
    code, out = bench("check", workdir / "results" / "digits" / "same")
    assert code == 0, out
    assert "passed" in out and "within noise" in out

    # a regression: the sampler silently draws at temperature 3 while the row says 1
    original = AbsorbingSampler.sample

    def degraded(self, noise, settings, trace=None):
        return original(self, noise, SamplerSettings(settings.sampler, settings.steps, 3.0), trace)

    monkeypatch.setattr(AbsorbingSampler, "sample", degraded)
    code, out = bench(*run, "--run-name", "hot")
    assert code == 0
    code, out = bench("check", workdir / "results" / "digits" / "hot", "--json")
    assert code == 1, out
    result = json.loads(out)
    assert not result["passed"]
    assert any("absorbing-s4-t1: fid" in f and "significant" in f for f in result["failures"])


def test_check_fails_on_a_fid_ceiling(workdir, baseline):
    set_thresholds(workdir, 'fid_ceiling = { "absorbing-s4-t1" = 0.001 }')
    code, out = bench("check", baseline)
    assert code == 1 and "above the ceiling" in out


def test_compare_refuses_mismatched_protocols(workdir, baseline):
    code, out = bench(*RUN, "--run-name", "other", "--num-samples", 30)
    assert code == 0
    code, out = bench("compare", "baseline", "other")
    assert code == 2 and "num_samples" in out and "--allow-mismatch" in out
    code, out = bench("compare", "baseline", "other", "--allow-mismatch")
    assert code == 0 and "| absorbing, 4 steps, t=1 | fid |" in out


def _fake_run(path, device, rows):
    path.mkdir(parents=True)
    manifest = {"dataset": "digits", "dataset_content": "x", "num_samples": 10, "seed": 0, "extractor": "digits",
                "hashes": {}, "metrics": {}, "device": device}
    path.joinpath("results.json").write_text(json.dumps({"manifest": manifest, "rows": rows}))
    return path


def test_throughput_is_judged_only_on_the_same_device(tmp_path):
    from bench.compare import check_run
    from bench.config import Thresholds
    row = lambda ips, t: {"slug": "absorbing-s16-t1", "fid": 10.0, "img_per_s": ips, "sample_s_per_batch": t}  # noqa: E731
    base = _fake_run(tmp_path / "base", "cpu A", [row(100.0, 0.5)])
    thresholds = Thresholds(fid_regression=0.25, throughput_regression=0.5)
    slow = _fake_run(tmp_path / "slow", "cpu A", [row(40.0, 1.2)])
    assert not check_run(slow, thresholds, base)["passed"]
    ok = _fake_run(tmp_path / "ok", "cpu A", [row(60.0, 0.8)])
    assert check_run(ok, thresholds, base)["passed"]
    elsewhere = _fake_run(tmp_path / "elsewhere", "cpu B", [row(40.0, 1.2)])
    result = check_run(elsewhere, thresholds, base)
    assert result["passed"] and any("another device" in c for c in result["checks"])
    too_short = _fake_run(tmp_path / "short", "cpu A", [row(1.0, 0.01)])
    result = check_run(too_short, thresholds, base)
    assert result["passed"] and any("too short" in c for c in result["checks"])
