import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.config import DEFAULT_CONFIG

# Tests run beside other work on 2 cores: one thread avoids oversubscription stalls, and no test
# depends on the thread count.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")



def bench(*args):
    """The command line in this process: (exit code, output)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


DIGITS_FOLDER_DATASET = """
[datasets.folderdigits]
kind = "folder"
train = "{train}"
heldout = "{heldout}"
resolution = 16
channels = 1
extractor = "digits"
num_samples = 40
tokenizer = "builtin:digits/vq"
priors = {{ absorbing = "builtin:digits/absorbing" }}

[[datasets.folderdigits.sweep]]
sampler = "absorbing"
steps = [2]
temperature = [1.0]
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with the project's bench.toml, writing results and caches inside it."""
    text = DEFAULT_CONFIG.read_text()
    text = text.replace('results_dir = "results"', f'results_dir = "{tmp_path / "results"}"')
    text = text.replace('cache_dir = "~/.cache/bench"', f'cache_dir = "{tmp_path / "cache"}"')
    # timing is measured on its own (tests of bench perf and bench.timing): keep it short in runs
    text = text.replace("warmup = 1  ", "warmup = 0  ").replace("repeats = 3  ", "repeats = 1  ")
    text = text.replace("batch_size = 64\n", "batch_size = 16\n", 1)
    (tmp_path / "bench.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def add_folder_dataset(workdir: Path, train: Path, heldout: Path) -> None:
    with open(workdir / "bench.toml", "a") as f:
        f.write(DIGITS_FOLDER_DATASET.format(train=train, heldout=heldout))


def pytest_collection_modifyitems(items):
    """Benchmarks belong to the slow tier: `python -m pytest -m slow` (or tests/benchmarks with
    --benchmark-enable) runs them."""
    for item in items:
        if "benchmarks" in item.path.parts:
            item.add_marker(pytest.mark.slow)
