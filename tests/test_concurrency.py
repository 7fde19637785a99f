"""Two runs on one run folder: the second is refused while the first holds the lock, and a killed
run's lock does not block the next one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench as bench_package
from conftest import bench

PROJECT = Path(bench_package.__file__).resolve().parent.parent
ARGS = ("run", "--samplers", "data,absorbing", "--steps", "1", "--num-samples", "8", "--run-name", "same", "--quiet")
# `bench run` whose writing of each row waits for the file `go` to appear: the test decides when it goes on
HELD_RUN = """
import sys, time
from pathlib import Path
from bench.results import RunStore
write_row = RunStore.write_row
def held(self, row, grid):
    write_row(self, row, grid)
    deadline = time.time() + 120
    while not Path("go").exists() and time.time() < deadline:
        time.sleep(0.05)
RunStore.write_row = held
from bench.cli import main
main(sys.argv[1:], prog_name="bench")
"""


def _start(workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-c", HELD_RUN, *ARGS], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_on_the_same_name_is_refused(workdir):
    run = workdir / "results" / "digits" / "same"
    first = _start(workdir)
    try:
        _wait_for(run / "rows" / "data.json", first)   # the first holds the lock, one row written
        code, out = bench(*ARGS)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1, out
        assert lines[0].startswith(f"error: run {run} is in use by process {first.pid}"), out
    finally:
        (workdir / "go").touch()
        out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out
    stored = json.loads((run / "results.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v for k, v in stored["manifest"].items() if k != "finished"} == manifest
    assert [json.loads((run / "rows" / f"{r['slug']}.json").read_text()) for r in stored["rows"]] == stored["rows"]
    assert manifest["num_samples"] == 8 and stored["rows"][1]["n_samples"] == 8
    assert not (run.parent / ".same.lock").exists()


@pytest.mark.slow
def test_a_killed_runs_lock_does_not_block_the_next_run(workdir):
    run = workdir / "results" / "digits" / "same"
    first = _start(workdir)
    _wait_for(run / "rows" / "data.json", first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    lock = run.parent / ".same.lock"
    assert lock.read_text() == str(first.pid)   # left behind, naming a dead process
    code, out = bench(*ARGS)
    assert code == 2 and "unfinished" in out and "--resume" in out, out   # as any unfinished run
    code, out = bench(*ARGS, "--resume")
    assert code == 0, out
    assert [r["slug"] for r in json.loads((run / "results.json").read_text())["rows"]] == \
        ["data", "absorbing-s1-t1", "absorbing-s1-t0.8", "absorbing-s1-t0.9"]  # the digits sweep at --steps 1
    assert not lock.exists()
