"""bench.toml validation: every mistake is one clear error naming the key."""
from pathlib import Path

import pytest

from bench.config import DEFAULT_CONFIG, load_config
from bench.errors import BenchError
from bench.execution import Execution

GOOD = DEFAULT_CONFIG.read_text()


def write(tmp_path, text) -> Path:
    p = tmp_path / "bench.toml"
    p.write_text(text)
    return p


def test_shipped_config_loads_with_the_digits_sweep():
    cfg = load_config()
    ds = cfg.dataset(None)
    assert ds.name == "digits" and ds.num_samples == 1000
    assert ds.sweep[0].sampler == "absorbing" and ds.sweep[0].steps == (1, 2, 4, 8, 16, 32, 64)
    assert load_config(profile="ci").dataset("digits").num_samples < 1000


def test_a_dataset_execution_is_the_default_that_execution_overrides():
    from bench.config import run_settings
    cfg = load_config()
    assert cfg.execution(cfg.dataset("digits")) == "skip-idle+head-where-drawn"
    assert run_settings(cfg, "digits").execution.spec() == "skip-idle+head-where-drawn"
    assert run_settings(cfg, "digits", execution="plain").execution.spec() == "plain"
    assert cfg.execution(cfg.dataset("churches")) == cfg.run.execution == "plain"


def test_an_empty_dataset_execution_means_plain_not_the_run_default(tmp_path):
    text = GOOD.replace('execution = "plain"  ', 'execution = "bf16"  ', 1).replace(
        'execution = "skip-idle+head-where-drawn"', 'execution = ""')
    cfg = load_config(write(tmp_path, text))
    assert cfg.run.execution == "bf16" and cfg.execution(cfg.dataset("churches")) == "bf16"
    assert Execution.parse(cfg.execution(cfg.dataset("digits"))).spec() == "plain"


@pytest.mark.parametrize("text, message", [
    ("[run]\nseeed = 1\n", "unknown key 'run.seeed'"),
    ("[run]\nseed = 'one'\n", "run.seed must be an integer"),
    ("[run]\nseed = true\n", "run.seed must be an integer"),
    ("[metrics]\npr_k = 0\n", "metrics.pr_k must be positive"),
    ("[datasets.x]\nkind = 'digits'\n", "datasets.x.resolution is missing"),
    ("[datasets.x]\nkind = 'imagenet'\nresolution = 8\nchannels = 1\nextractor = 'digits'\ntokenizer = 't'\n",
     "datasets.x.kind = 'imagenet'"),
    ("[datasets.x]\nkind = 'folder'\nresolution = 8\nchannels = 1\nextractor = 'digits'\ntokenizer = 't'\n",
     "datasets.x.train"),
    ("[datasets.x]\nkind = 'digits'\nresolution = 8\nchannels = 1\nextractor = 'd'\ntokenizer = 't'\n"
     "[[datasets.x.sweep]]\nsampler = 'absorbing'\nsteps = [1, 'two']\n", r"datasets.x.sweep\[0\].steps must be a list of integers"),
    ("[datasets.x]\nkind = 'digits'\nresolution = 8\nchannels = 1\nextractor = 'd'\ntokenizer = 't'\n"
     "[[datasets.x.sweep]]\nsteps = [1]\n", r"sweep\[0\].sampler is missing"),
    ("[datasets.x]\nkind = 'digits'\nresolution = 8\nchannels = 1\nextractor = 'd'\ntokenizer = 't'\ncolour = 1\n",
     "unknown key 'datasets.x.colour'"),
    ("[run\nseed = 1\n", "not valid TOML"),
    ("[thresholds.digits]\nfid_ceiling = { a = 'x' }\n", "thresholds.digits.fid_ceiling must be a table of numbers"),
    ("[datasets.x]\nkind = 'digits'\nresolution = 8\nchannels = 1\nextractor = 'd'\ntokenizer = 't'\n"
     "execution = 'skip-idel'\n", "datasets.x.*skip-idel"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(BenchError, match=message) as e:
        load_config(write(tmp_path, text))
    assert "\n" not in str(e.value)
    assert str(tmp_path / "bench.toml") in str(e.value)


def test_missing_file_unknown_dataset_and_profile(tmp_path):
    with pytest.raises(BenchError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(BenchError, match="unknown dataset 'cifar'.*digits"):
        load_config().dataset("cifar")
    with pytest.raises(BenchError, match="unknown profile 'fast'"):
        load_config(profile="fast")


def test_profile_overlay_is_validated(tmp_path):
    with pytest.raises(BenchError, match="profiles.ci.run.sed"):
        load_config(write(tmp_path, "[profiles.ci.run]\nsed = 1\n"), profile="ci")


def test_env_vars_in_paths(tmp_path, monkeypatch):
    text = ("[datasets.churches]\nkind = 'lsun'\nresolution = 256\nchannels = 3\nextractor = 'digits'\n"
            "tokenizer = 't'\ntrain = '${LSUN_ROOT}/church_outdoor_train_lmdb'\n")
    cfg = load_config(write(tmp_path, text))
    ds = cfg.dataset("churches")
    monkeypatch.delenv("LSUN_ROOT", raising=False)
    with pytest.raises(BenchError, match=r"\$\{LSUN_ROOT\}, which is not set; export LSUN_ROOT"):
        ds.source.path("train")
    monkeypatch.setenv("LSUN_ROOT", "/data/lsun")
    assert ds.source.path("train") == Path("/data/lsun/church_outdoor_train_lmdb")
    with pytest.raises(BenchError, match="datasets.churches.heldout is not set"):
        ds.source.path("heldout")
