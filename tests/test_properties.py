"""Property tests: whatever bench.toml or the command line holds, bench answers with a result or one
clear error (BenchError / a usage error, exit 2), never a traceback.

`bench run` examples never start a real run: bench.protocol.reference_features (the first step after
every input has been loaded and checked: config, dataset, checkpoints, samplers, run directory) is
replaced by a stand-in that raises a BenchError marked STOPPED. So everything `bench run` validates is
exercised, and an example that passes validation ends with exit 2 and the marker instead of sampling.
"""
import json
import math
import os
import tomllib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

import bench.protocol
from bench.cli import main
from bench import config as config_module
from bench.config import DEFAULT_CONFIG, Config, load_config
from bench.errors import BenchError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])

# ----------------------------------------------------------------------------- TOML


def _schema_keys() -> set:
    """Every key bench.toml's typed sections take."""
    from dataclasses import fields
    sections = (config_module.RunSection, config_module.MetricsSection, config_module.TimingSection,
                config_module.Thresholds, config_module.SweepEntry, config_module.DatasetConfig,
                config_module.DatasetMetrics)
    return {f.name for cls in sections for f in fields(cls)} | set(config_module.TOP_LEVEL)


KNOWN_KEYS = sorted(_schema_keys() | {"digits", "ci", "absorbing", "autoregressive", "dataset"})
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
scalars = st.one_of(st.text(max_size=12), st.integers(-5, 300), st.integers(), st.floats(), st.booleans(),
                    st.sampled_from(["digits", "folder", "lsun", "cpu", "cuda", "skip", "error", "absorbing",
                                     "builtin:digits/vq", "${UNSET_VAR}/x", "churches", "maskgit"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
trees = st.dictionaries(keys, st.one_of(values, st.dictionaries(keys, values, max_size=5)), max_size=6)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(tree: dict) -> str:
    return "".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}\n" for k, v in tree.items())


PROJECT_TREE = tomllib.loads(DEFAULT_CONFIG.read_text())


def _paths(tree, prefix=()):
    """Every path to a value of the project's config (into tables and arrays)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        yield prefix + (k,)
        if isinstance(v, (dict, list)):
            yield from _paths(v, prefix + (k,))


PROJECT_PATHS = list(_paths(PROJECT_TREE))


@st.composite
def mutated_project_config(draw):
    """The project's bench.toml with a few values replaced or keys added: reaches deep validation."""
    tree = json.loads(json.dumps(PROJECT_TREE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PROJECT_PATHS))
        node = tree
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()) or not isinstance(node, dict):
                node[path[-1]] = draw(values)
            else:
                node[draw(keys)] = draw(values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced this path
    return tree


@SETTINGS
@given(tree=st.one_of(trees, mutated_project_config()), profile=st.sampled_from([None, "ci", "nope", ""]))
def test_any_config_loads_or_is_one_bench_error(tmp_path, tree, profile):
    path = tmp_path / "bench.toml"
    path.write_text(to_toml(tree))
    try:
        cfg = load_config(path, profile)
    except BenchError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)


def test_the_mutated_configs_serialise_faithfully(tmp_path):
    """to_toml round-trips the project's own config, so the mutations above start from valid input."""
    assert tomllib.loads(to_toml(PROJECT_TREE)) == PROJECT_TREE
    assert isinstance(load_config(DEFAULT_CONFIG), Config)


# ----------------------------------------------------------------------------- command lines

STOPPED = "STOPPED by tests/test_properties.py before any sampling"


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A working directory whose bench.toml writes inside it, with feature files for `bench score`."""
    d = tmp_path_factory.mktemp("cli")
    text = DEFAULT_CONFIG.read_text()
    text = text.replace('results_dir = "results"', f'results_dir = "{d / "results"}"')
    text = text.replace('cache_dir = "~/.cache/bench"', f'cache_dir = "{d / "cache"}"')
    (d / "bench.toml").write_text(text)
    rng = np.random.default_rng(0)
    meta = {"extractor": np.array("digits"), "weights_sha256": np.array("ab" * 32)}
    np.savez(d / "real.npz", features=rng.normal(size=(30, 4)), **meta)
    np.savez(d / "fake.npz", features=rng.normal(size=(20, 4)), **meta)
    np.savez(d / "nan.npz", features=np.full((20, 4), np.nan), **meta)
    np.savez(d / "one.npz", features=rng.normal(size=(1, 4)), **meta)
    np.savez(d / "flat.npz", features=rng.normal(size=20), **meta)
    np.savez(d / "wide.npz", features=rng.normal(size=(20, 6)), **meta)
    np.savez(d / "other.npz", features=rng.normal(size=(20, 4)), extractor=np.array("inception-v3-compat"),
             weights_sha256=np.array("cd" * 32))
    np.savez(d / "nokeys.npz", x=np.zeros(3))
    (d / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    (d / "bad.toml").write_text("[run\n")
    return d


@contextmanager
def in_dir(d: Path):
    old = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(old)


def invoke(d: Path, args: list[str]):
    def stop(*a, **kw):
        raise BenchError(STOPPED)
    with pytest.MonkeyPatch.context() as mp, in_dir(d):
        mp.setattr(bench.protocol, "reference_features", stop)
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert "Traceback" not in result.output, (args, result.output)
    return result


# no NUL byte: a real command line cannot hold one (argv strings are NUL-terminated)
JUNK = ["", "x", "-1", "0", "1", "3", "1.5", "nan", "1,x", ",", "1,,2", "99999999999999999999", "..", "/", "a/b",
        "\t", "é", "--", "-", "digits", "absorbing", "data,absorbing", "cpu", "cuda", "ci", "bench.toml", "bad.toml",
        "nope.toml", "."]
RUN_OPTIONS = {
    "--dataset": ["digits", "churches", "folderdigits", "nope"],
    "--config": ["bench.toml", "bad.toml", "nope.toml", "."],
    "--profile": ["ci", "nope"],
    "--samplers": ["absorbing", "data,absorbing", "random-codes", "maskgit", "diffusion", ",", "autoregressive"],
    "--steps": ["1", "1,2", "0", "1,x", "64", "65", "1000"],
    "--num-samples": ["1", "2", "0", "-3", "x"],
    "--device": ["cpu", "cuda", "tpu"],
    "--run-name": ["r", "", ".hidden", "a/b", "..", "r2"],
    "--resume": None, "--force": None, "--quiet": None,
}
SAMPLE_OPTIONS = {
    "--sampler": ["absorbing", "autoregressive", "autoregressive-recompute", "maskgit", "random-codes", "nope"],
    "--dataset": ["digits", "churches", "nope"],
    "--steps": ["1", "2", "0", "65", "x"],
    "--temperature": ["0", "1", "0.5", "-1", "nan", "inf", "x"],
    "--top-k": ["1", "5", "0", "x"],
    "--top-p": ["0.5", "1", "0", "1.5", "nan"],
    "--num": ["1", "3", "0", "x"],
    "--seed": ["0", "7", "-1", "x", "99999999999999999999"],
    "--first-index": ["0", "5", "-1"],
    "--batch-size": ["1", "2", "0"],
    "--device": ["cpu", "cuda"],
    "--out": ["s.npz", "sub/t.npz", ".", "", "real.npz/x"],
    "--config": ["bench.toml", "bad.toml", "nope.toml"],
}
SCORE_FILES = ["real.npz", "fake.npz", "nan.npz", "one.npz", "flat.npz", "wide.npz", "other.npz", "nokeys.npz",
               "junk.npz", "absent.npz", ".", ""]
SCORE_OPTIONS = {"--json": None, "--memorisation": None, "--config": ["bench.toml", "bad.toml", "nope.toml"]}


@st.composite
def arg_lists(draw, options: dict):
    args = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(sorted(options) + ["--bogus"]))
        args.append(name)
        choices = options.get(name, JUNK)
        if choices is not None:  # None: a flag
            args.append(draw(st.sampled_from(choices if draw(st.booleans()) else JUNK)))
    if draw(st.integers(0, 9)) == 0:
        args.insert(draw(st.integers(0, len(args))), draw(st.sampled_from(JUNK)))  # a stray positional
    return args


@SETTINGS
@given(args=arg_lists(RUN_OPTIONS))
def test_run_arguments_never_crash(cli_dir, args):
    result = invoke(cli_dir, ["run", *args])
    assert result.exit_code != 0  # never a real run: STOPPED ends every valid one


@SETTINGS
@given(args=arg_lists(SAMPLE_OPTIONS))
def test_sample_arguments_never_crash(cli_dir, args):
    invoke(cli_dir, ["sample", *args])


@SETTINGS
@given(files=st.lists(st.sampled_from(SCORE_FILES), min_size=0, max_size=3), args=arg_lists(SCORE_OPTIONS))
def test_score_arguments_never_crash(cli_dir, files, args):
    invoke(cli_dir, ["score", *files, *args])


def test_a_valid_run_reaches_the_stand_in(cli_dir):
    """The stand-in is reached only after every check passed: valid arguments end there."""
    result = invoke(cli_dir, ["run", "--samplers", "absorbing", "--steps", "1", "--num-samples", "8", "--quiet"])
    assert result.exit_code == 2 and STOPPED in result.output
