import pytest
"""A run killed part-way resumes to the same results as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from bench.cli import main

ARGS = ["run", "--num-samples", "60", "--steps", "2,64", "--samplers", "random-codes,absorbing", "--quiet"]
METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "memorisation", "n_samples")


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_results(workdir):
    result = CliRunner().invoke(main, ARGS + ["--run-name", "whole"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    whole = json.loads((workdir / "results" / "digits" / "whole" / "results.json").read_text())["rows"]

    run_dir = workdir / "results" / "digits" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bench"] + ARGS + ["--run-name", "killed"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "rows" / "absorbing-s2-t1.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-way through the 64-step row
    proc.wait()
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "rows" / "absorbing-s64-t1.json").exists()
    assert not list(run_dir.rglob("*.tmp")), "a half-written file was left behind"
    kept = (run_dir / "rows" / "absorbing-s2-t1.json").read_text()

    result = CliRunner().invoke(main, ARGS + ["--run-name", "killed"], catch_exceptions=False)
    assert result.exit_code == 2 and "--resume" in result.output  # never continued or overwritten silently
    result = CliRunner().invoke(main, ARGS + ["--run-name", "killed", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (run_dir / "rows" / "absorbing-s2-t1.json").read_text() == kept  # finished rows are not recomputed
    resumed = json.loads((run_dir / "results.json").read_text())["rows"]
    assert [r["slug"] for r in resumed] == [r["slug"] for r in whole]
    for a, b in zip(resumed, whole):
        for k in METRICS:
            assert a[k] == b[k], (a["slug"], k)


@pytest.mark.slow
def test_a_row_killed_part_way_keeps_its_finished_batches(workdir, monkeypatch):
    """Batches of 10: the kill lands inside the 64-step row; on resume its finished batches are read
    back from their shards, not sampled again, and the results equal an uninterrupted run's."""
    toml = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(toml.replace("\nbatch_size = 250 ", "\nbatch_size = 10 ", 1))
    result = CliRunner().invoke(main, ARGS + ["--run-name", "whole"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    whole = json.loads((workdir / "results" / "digits" / "whole" / "results.json").read_text())["rows"]

    run_dir = workdir / "results" / "digits" / "killed"
    shard_dir = run_dir / "rows" / "absorbing-s64-t1.shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bench"] + ARGS + ["--run-name", "killed"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(shard_dir.glob("*.npz"))) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(shard_dir.glob("*.npz")))
    assert 2 <= finished < 6 and not list(shard_dir.glob("*.tmp"))

    from bench.samplers.absorbing import AbsorbingSampler
    calls = []
    original = AbsorbingSampler.sample

    def counting(self, noise, settings, trace=None):
        # scoring batches of the row that was cut (t = 1), not the timing batch nor the later rows at t = 0.8, 0.9
        if settings.steps == 64 and settings.temperature == 1.0 and len(noise) == 10:
            calls.append(noise.indices[0])
        return original(self, noise, settings, trace)

    monkeypatch.setattr(AbsorbingSampler, "sample", counting)
    result = CliRunner().invoke(main, ARGS + ["--run-name", "killed", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(calls) == 6 - finished
    assert not shard_dir.exists()  # the finished row replaces its shards
    resumed = json.loads((run_dir / "results.json").read_text())["rows"]
    for a, b in zip(resumed, whole):
        for k in METRICS:
            assert a[k] == b[k], (a["slug"], k)
    assert (run_dir / "samples" / "absorbing-s64-t1.png").read_bytes() == \
        (workdir / "results" / "digits" / "whole" / "samples" / "absorbing-s64-t1.png").read_bytes()
