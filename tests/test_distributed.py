"""torchrun: a run sharded over 2 processes gives the numbers of a single process, bit for bit."""
import json
from pathlib import Path
import os
import subprocess
import sys

import pytest

from bench.distributed import SINGLE, Dist, from_env

METRICS = ("fid", "kid_mean", "precision", "recall", "density", "coverage")
ARGS = ["run", "--num-samples", "24", "--steps", "2", "--samplers", "absorbing", "--quiet"]


def test_batches_are_dealt_once_each():
    starts = list(range(0, 37, 10))
    for world in (1, 2, 3, 5):
        shares = [Dist(r, world).my_batches(starts) for r in range(world)]
        assert sorted(s for share in shares for s in share) == starts


def test_rank_from_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert from_env() == SINGLE
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    ctx = from_env()
    assert ctx == Dist(1, 2, 1) and not ctx.is_main and ctx.device("cuda") == "cuda:1" and ctx.device("cpu") == "cpu"


def _run(workdir, prefix, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, *prefix, "-m", "bench", *ARGS, "--run-name", name], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, json.loads((workdir / "results" / "digits" / name / "results.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes_match_one(workdir):
    # batches of 5: 24 samples make 5 batches, so both ranks sample (rank 0: 3 batches, rank 1: 2)
    text = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(text.replace("batch_size = 250", "batch_size = 5", 1))
    _, single = _run(workdir, [], "single")
    # --standalone: a free local port, so concurrent test runs do not collide
    out, dist = _run(workdir, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "dist")
    assert out.count("wrote ") == 1  # rank 0 alone reports (and writes)
    assert dist["manifest"]["distributed"]["world_size"] == 2
    assert [r["slug"] for r in dist["rows"]] == [r["slug"] for r in single["rows"]] == \
        ["absorbing-s2-t1", "absorbing-s2-t0.8", "absorbing-s2-t0.9"]  # the digits sweep at --steps 2
    for a, b in zip(single["rows"], dist["rows"]):
        assert a["n_samples"] == b["n_samples"] == 24
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-9), k
    grid = "samples/absorbing-s2-t1.png"
    assert (workdir / "results/digits/dist" / grid).read_bytes() == (workdir / "results/digits/single" / grid).read_bytes()


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc) -> None:
    """SIGKILL torchrun and every process under it (its ranks run in sessions of their own), and wait
    until they are gone."""
    import signal
    import time
    pids = _descendants(proc.pid)
    for pid in [proc.pid] + pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
              for pid in pids) and time.time() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_torchrun_killed_part_way_resumes_to_the_single_process_numbers(workdir):
    """Kill every rank in the middle of a row; resume under torchrun; the finished batches' shards
    (keyed by batch start, not by rank) are reused and the numbers equal one uninterrupted process."""
    import signal
    import time
    text = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(text.replace("batch_size = 250", "batch_size = 5", 1))
    args = ["run", "--num-samples", "24", "--steps", "64", "--samplers", "absorbing", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    single = subprocess.run([sys.executable, "-m", "bench", *args, "--run-name", "single"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "bench", *args, "--run-name", "dist"]
    shards = workdir / "results" / "digits" / "dist" / "rows" / "absorbing-s64-t1.shards"
    proc = subprocess.Popen(torchrun, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(list(shards.glob("*.npz"))) < 2:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    _kill_tree(proc)
    assert not (workdir / "results" / "digits" / "dist" / "results.json").exists()
    resumed = subprocess.run(torchrun + ["--resume"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = json.loads((workdir / "results/digits/single/results.json").read_text())["rows"][0]
    b = json.loads((workdir / "results/digits/dist/results.json").read_text())["rows"][0]
    assert a["n_samples"] == b["n_samples"] == 24
    for k in METRICS:
        assert b[k] == pytest.approx(a[k], rel=1e-9), k


@pytest.mark.slow
def test_two_nodes_through_torchrun_rendezvous_match_one_process(workdir):
    """Two torchrun launches (--nnodes 2, one process each) meeting at a c10d rendezvous on
    localhost: the multi-node path, on one machine."""
    import socket
    text = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(text.replace("batch_size = 250", "batch_size = 5", 1))
    _, single = _run(workdir, [], "single")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "bench-test",
              "-m", "bench", *ARGS, "--run-name", "nodes"]
    nodes = [subprocess.Popen(launch, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs
    result = json.loads((workdir / "results" / "digits" / "nodes" / "results.json").read_text())
    assert result["manifest"]["distributed"]["world_size"] == 2
    for a, b in zip(single["rows"], result["rows"]):
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-9), k
