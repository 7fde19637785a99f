"""The speed switches of bench.execution: exact where exactness is possible (the plain fp32 path's
tokens), distributional agreement where it is not (bf16), and every row saying which were used."""
import json

import numpy as np
import pytest
import torch

from baselines.autoregressive import AutoregressiveRecomputeSampler, AutoregressiveSampler
from baselines.maskgit import MaskGITSampler
from bench.samplers.absorbing import AbsorbingSampler, mask_tokens
from bench.data import digits_split, to_float
from bench.errors import BenchError
from bench.execution import Execution, Network
from bench.loading import load_transformer, load_vq
from bench.samplers import SamplerSettings, generate
from conftest import bench


@pytest.fixture(scope="module")
def priors():
    return (load_transformer("builtin:digits/absorbing", "absorbing")[0],
            load_transformer("builtin:digits/autoregressive", "autoregressive")[0])


def test_specs_parse_and_name_what_is_wrong():
    assert Execution.parse(None).spec() == "plain" == Execution.parse("plain").spec()
    assert Execution.parse("fast").spec() == "bf16+skip-idle+head-where-drawn+compile"
    assert Execution.parse("head-where-drawn, bf16").spec() == "bf16+head-where-drawn"  # canonical order
    assert Execution.parse("bf16").dtype == "bfloat16" and Execution.parse("compile").dtype == "float32"
    with pytest.raises(BenchError, match="unknown switch 'fp8'"):
        Execution.parse("bf16+fp8")
    with pytest.raises(BenchError, match="needs a CUDA device"):
        Execution.parse("cuda-graphs").check_device("cpu")
    # a sampler keeps the switches it can use, and says so
    den = load_transformer("builtin:digits/absorbing", "absorbing")[0]
    maskgit = MaskGITSampler(den, execution=Execution.parse("fast"))
    assert maskgit.options.spec() == "bf16+compile" and "bf16+compile (bfloat16)" in maskgit.execution()
    assert AbsorbingSampler(den).execution().endswith("execution plain (float32)")


def _exactness_cases():
    """Every switch at 1 and 8 steps in the fast tier; at 64 steps in the slow tier."""
    for spec in ("skip-idle", "head-where-drawn", "skip-idle+head-where-drawn"):
        for steps, temperature, top_k in ((1, 1.0, None), (8, 0.7, 5), (64, 1.0, None), (64, 0.0, None)):
            fast_tier = steps < 64
            yield pytest.param(spec, steps, temperature, top_k, marks=() if fast_tier else pytest.mark.slow)


@pytest.mark.parametrize("spec,steps,temperature,top_k", list(_exactness_cases()))
def test_dropping_discarded_work_gives_the_plain_tokens(priors, spec, steps, temperature, top_k):
    den, _ = priors
    settings = SamplerSettings("absorbing", steps, temperature, top_k)
    plain = generate(AbsorbingSampler(den), settings, 3, range(48), 48, progress=False)
    fast = AbsorbingSampler(den, execution=Execution.parse(spec))
    assert np.array_equal(generate(fast, settings, 3, range(48), 48, progress=False), plain)
    assert np.array_equal(generate(fast, settings, 3, range(48), 7, progress=False), plain)  # other batches
    if "skip-idle" in spec and steps == 64:  # 64 tokens over 64 steps: about e^-1 of the passes are idle
        assert 0.5 * steps < fast.passes_per_image < 0.8 * steps


@pytest.mark.slow
def test_compiled_paths_give_the_plain_tokens(priors):
    """Inductor on the CPU: the absorbing trunk with every exact switch (one dynamic graph), and the
    cached autoregressive step on its static cache, called twice (the cache is reused)."""
    den, ar = priors
    settings = SamplerSettings("absorbing", 16, 1.0)
    plain = generate(AbsorbingSampler(den), settings, 0, range(32), 16, progress=False)
    fast = AbsorbingSampler(den, execution=Execution.parse("skip-idle+head-where-drawn+compile"))
    assert np.array_equal(generate(fast, settings, 0, range(32), 16, progress=False), plain)
    settings = SamplerSettings("autoregressive", None, 1.0)
    plain = generate(AutoregressiveSampler(ar), settings, 0, range(32), 16, progress=False)
    compiled = AutoregressiveSampler(ar, execution=Execution.parse("compile"))
    for _ in range(2):
        assert np.array_equal(generate(compiled, settings, 0, range(32), 16, progress=False), plain)


def test_static_cache_step_matches_the_growing_cache(priors):
    _, ar = priors
    x = torch.randint(0, 64, (5, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        growing, static = ar.new_cache(5), ar.new_cache(5)
        ar.hidden(x[:, :0], growing)
        ar.hidden(x[:, :0], static)
        for i in range(1, 64):
            a = ar.hidden(x[:, i - 1:i], growing)
            b = ar.hidden_at(x[:, i - 1:i], torch.tensor([i]), static)
            assert torch.allclose(a, b, atol=1e-5), i


def _conditionals_tv(net_a: Network, net_b: Network, tokens: torch.Tensor, temperature_b: float = 1.0) -> torch.Tensor:
    """Total variation distance between the two networks' per-position draw distributions."""
    with torch.no_grad():
        pa, pb = net_a(tokens).softmax(-1), (net_b(tokens) / temperature_b).softmax(-1)
    return 0.5 * (pa - pb).abs().sum(-1)


@pytest.mark.slow
def test_bf16_draws_from_nearly_the_same_conditionals(priors):
    """bf16 changes the logits, so tokens differ; what must hold is that every conditional the sampler
    draws from stays close. Measured on real held-out token grids (masked at random rates for the
    denoiser, every prefix for the autoregressive prior): mean total variation below 0.01 per position.
    The check has teeth: a 5% temperature change, a shift far too small to see in FID at N = 500,
    breaks it."""
    den, ar = priors
    vq, _ = load_vq("builtin:digits/vq")
    held = digits_split("heldout")
    x0 = vq.encode(to_float(np.stack([held[i] for i in range(256)]))).reshape(256, -1)
    g = torch.Generator().manual_seed(0)
    x_t, masked = mask_tokens(x0, torch.randint(1, 65, (256,), generator=g), 64, den.cfg.mask_id, g)
    plain, bf16 = Execution(), Execution.parse("bf16")
    for net, tokens, where in ((den, x_t, masked), (ar, x0[:, :-1], torch.ones_like(x0, dtype=torch.bool))):
        tv = _conditionals_tv(Network(net, plain), Network(net, bf16), tokens)[where]
        assert tv.mean() < 0.01 and tv.max() < 0.05, (tv.mean(), tv.max())
        warmer = _conditionals_tv(Network(net, plain), Network(net, plain), tokens, temperature_b=1.05)[where]
        assert warmer.mean() > 0.01
    # the compiled autoregressive path's static-shape step, under bf16 with a bf16 cache
    with torch.no_grad():
        reference = ar(x0[:, :-1]).softmax(-1)
        cache, steps = ar.new_cache(256, torch.bfloat16), []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            steps.append(ar.project(ar.hidden(x0[:, :0], cache)[:, -1]).float())
            for i in range(1, 64):
                steps.append(ar.project(ar.hidden_at(x0[:, i - 1:i], torch.tensor([i]), cache)[:, -1]).float())
        tv = 0.5 * (torch.stack(steps, 1).softmax(-1) - reference).abs().sum(-1)
    assert tv.mean() < 0.01 and tv.max() < 0.05, (tv.mean(), tv.max())


@pytest.mark.slow
def test_bf16_samples_score_like_plain_ones(priors):
    """The whole path under bf16: FID of bf16 samples against plain ones lies within the spread of two
    plain seeds (digits features, N = 400)."""
    from bench.data import to_uint8
    from bench.features import load_extractor
    from bench.metrics import fid
    den, _ = priors
    vq, _ = load_vq("builtin:digits/vq")
    extractor = load_extractor("digits")

    def features(execution, seed):
        tokens = generate(AbsorbingSampler(den, execution=execution), SamplerSettings("absorbing", 16, 1.0), seed,
                          range(400), 200, progress=False)
        with torch.no_grad():
            return extractor(to_uint8(vq.decode(torch.as_tensor(tokens).reshape(-1, 8, 8))))

    plain0, plain1, bf16 = features(Execution(), 0), features(Execution(), 1), features(Execution.parse("bf16"), 1)
    assert fid(bf16, plain0) < 1.5 * fid(plain1, plain0)


@pytest.mark.slow
def test_run_records_switches_and_exact_ones_keep_the_numbers(workdir):
    args = ("run", "--samplers", "absorbing,autoregressive", "--steps", "4", "--num-samples", 40, "--quiet")
    assert bench(*args, "--run-name", "plain", "--execution", "plain")[0] == 0  # digits' own: skip-idle+...
    code, out = bench(*args, "--run-name", "fast", "--execution", "skip-idle+head-where-drawn+bf16")
    assert code == 0, out
    load = lambda name: json.loads((workdir / "results" / "digits" / name / "results.json").read_text())  # noqa: E731
    plain, fast = load("plain"), load("fast")
    assert fast["manifest"]["execution"] == "bf16+skip-idle+head-where-drawn"
    rows = {r["sampler"]: r for r in fast["rows"]}
    assert rows["absorbing"]["switches"] == "bf16+skip-idle+head-where-drawn"
    assert rows["autoregressive"]["switches"] == "bf16" and rows["autoregressive"]["dtype"] == "bfloat16"
    assert "execution bf16 (bfloat16)" in rows["autoregressive"]["execution"]
    assert all(r["switches"] == "plain" and r["dtype"] == "float32" for r in plain["rows"])
    code, out = bench("compare", "plain", "fast")
    assert code == 0 and "execution differs for absorbing, 4 steps, t=1: REF plain, RUN bf16+skip-idle" in out
    # the exact switches alone reproduce the plain run's metrics bit for bit
    assert bench(*args, "--run-name", "exact", "--execution", "skip-idle+head-where-drawn")[0] == 0
    exact = {r["slug"]: r for r in load("exact")["rows"]}
    for r in plain["rows"]:
        assert exact[r["slug"]]["fid"] == r["fid"]
    # an interrupted run is not resumed under other switches
    run_dir = workdir / "results" / "digits" / "exact"
    (run_dir / "results.json").unlink()
    code, out = bench(*args, "--run-name", "exact", "--resume", "--execution", "bf16")
    assert code == 2 and "execution: 'skip-idle+head-where-drawn' vs 'bf16'" in out


def test_unknown_switches_are_refused_before_anything_is_written(workdir):
    code, out = bench("run", "--execution", "turbo", "--quiet")
    assert code == 2 and "unknown switch 'turbo'" in out
    text = (workdir / "bench.toml").read_text()
    (workdir / "bench.toml").write_text(text.replace('execution = "plain"', 'execution = "bf17"', 1))
    code, out = bench("run", "--quiet")
    assert code == 2 and "run.execution 'bf17': unknown switch" in out
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_gpu_perf_script_leaves_a_table_whatever_happens(tmp_path):
    """scripts/perf_gpu.py on the CPU at the tiny shape: the first row always runs, rows past the
    time budget are listed as not run, and a switch the device lacks (cuda-graphs) is never reached."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "scripts" / "perf_gpu.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--shape", "tiny", "--budget", "0",
                          "--batch-scale", "0.02", "--no-features", "--out", str(tmp_path / "perf")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "perf" / "results.json").read_text())["rows"]
    assert len(rows) == 11 and "error" not in rows[0] and rows[0]["sampling_img_per_s"] > 0
    assert rows[0]["switches"] == "bf16+skip-idle+head-where-drawn+compile"
    assert all(r["error"].startswith("not run") for r in rows[1:])
    assert "not run" in (tmp_path / "perf" / "results.md").read_text()


def test_sample_command_takes_switches_and_records_them(workdir):
    common = ("sample", "--sampler", "absorbing", "--steps", 8, "--num", 16)
    assert bench(*common, "--out", workdir / "plain.npz")[0] == 0
    code, out = bench(*common, "--execution", "skip-idle+head-where-drawn", "--out", workdir / "fast.npz")
    assert code == 0, out
    plain, fast = np.load(workdir / "plain.npz"), np.load(workdir / "fast.npz")
    assert np.array_equal(plain["tokens"], fast["tokens"]) and np.array_equal(plain["images"], fast["images"])
    assert str(fast["execution"]).endswith("execution skip-idle+head-where-drawn (float32)")
