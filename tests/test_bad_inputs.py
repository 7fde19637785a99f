"""Bad input, table-driven: every case exits 2 with exactly one `error:` line naming the thing, no
traceback, no warning, and no new or changed file anywhere in its working folder (results, cache,
outputs) or in the shipped weights. A finished run is built once per module and each case works on a
copy of it. Below the table: what is accepted instead of refused (exit 1 only for a breached threshold)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bench.checkpoints import WEIGHTS_DIR
from bench.cli import main
from bench.config import DEFAULT_CONFIG
from bench.data import digits_split

OFFICIAL = Path(__file__).parent / "fixtures" / "official_tiny"
PROJECT_RESULTS = DEFAULT_CONFIG.parent / "results"

FOLDER_DATASET = """
[datasets.fd]
kind = "folder"
train = "data/train"
heldout = "data/heldout"
resolution = 16
channels = 1
extractor = "digits"
num_samples = 12
tokenizer = "builtin:digits/vq"
priors = { absorbing = "builtin:digits/absorbing" }

[[datasets.fd.sweep]]
sampler = "absorbing"
steps = [1]
temperature = [1.0]
"""


def invoke(*args, env: dict | None = None):
    """The command line in this process -> (exit code, output, warnings). Unexpected exceptions come
    back as a traceback in the output, as a user would see them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    out = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        out += "Traceback (in-process):\n" + "".join(traceback.format_exception(result.exception))
    return result.exit_code, out, [str(w.message) for w in caught]


def snapshot(root: Path, hash_files: bool = True) -> dict:
    """Every path under root: folders, symlinks (their targets) and files (their bytes' hash, or their
    size and modification time)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("dir",)
            elif p.is_file():
                st = p.stat()
                out[str(p)] = ("file", hashlib.sha1(p.read_bytes()).hexdigest() if hash_files
                               else (st.st_size, st.st_mtime_ns))
            else:
                out[str(p)] = ("other",)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted([f"new {p}" for p in set(after) - set(before)] + [f"gone {p}" for p in set(before) - set(after)]
                  + [f"changed {p}" for p in set(before) & set(after) if before[p] != after[p]])


def _digit_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A project folder: bench.toml (results and cache inside, dataset `fd` of 30 + 12 PNG digits), a
    finished run results/fd/done, the published churches numbers and the digits baseline."""
    root = tmp_path_factory.mktemp("base")
    text = DEFAULT_CONFIG.read_text()
    for old, new in (('dataset = "digits"  ', 'dataset = "fd"  '), ('cache_dir = "~/.cache/bench"', 'cache_dir = "cache"'),
                     ("warmup = 1  ", "warmup = 0  "), ("repeats = 3  ", "repeats = 1  "),
                     ("batch_size = 64\n", "batch_size = 16\n")):
        assert old in text, old
        text = text.replace(old, new, 1)
    (root / "bench.toml").write_text(text + FOLDER_DATASET)
    _digit_pngs(root / "data" / "train", digits_split("train").images[:30])
    _digit_pngs(root / "data" / "heldout", digits_split("heldout").images[:12])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code, out, _ = invoke("run", "--samplers", "data,absorbing", "--run-name", "done", "--quiet")
    finally:
        os.chdir(cwd)
    assert code == 0, out
    shutil.copytree(PROJECT_RESULTS / "churches" / "paper", root / "results" / "churches" / "paper")
    shutil.copytree(PROJECT_RESULTS / "digits" / "baseline", root / "results" / "digits" / "baseline")
    return root


# ----------------------------------------------------------------------------- helpers for the cases

def edit(root: Path, old: str, new: str, file: str = "bench.toml") -> None:
    f = root / file
    text = f.read_text()
    assert old in text, (old, file)
    f.write_text(text.replace(old, new, 1))


def append(root: Path, text: str) -> None:
    with open(root / "bench.toml", "a") as f:
        f.write(text)


def digits_table(name: str = "x", sweep: str = 'sampler = "absorbing"\nsteps = [1]\n', extra: str = "") -> str:
    return (f'\n[datasets."{name}"]\nkind = "digits"\nresolution = 16\nchannels = 1\nextractor = "digits"\n'
            f'tokenizer = "builtin:digits/vq"\npriors = {{ absorbing = "builtin:digits/absorbing" }}\n{extra}'
            f'\n[[datasets."{name}".sweep]]\n{sweep}')


def results_json(root: Path, change: Callable[[dict], object] | None = None, raw: bytes | None = None,
                 run: str = "done") -> None:
    f = root / "results" / "fd" / run / "results.json"
    if raw is not None:
        f.write_bytes(raw)
        return
    data = json.loads(f.read_text())
    change(data)
    f.write_text(json.dumps(data))


def first_row(fn):
    def change(data):
        fn(data["rows"][0])
    return change


def unfinished(root: Path, name: str = "partial") -> Path:
    run = root / "results" / "fd" / name
    shutil.copytree(root / "results" / "fd" / "done", run)
    (run / "results.json").unlink()
    return run


def ckpt(root: Path, name: str = "vq") -> Path:
    """A copy of the shipped digits checkpoint `name` at ckpt/<name>, used as fd's tokenizer (vq) or prior."""
    (root / "ckpt").mkdir(exist_ok=True)
    for ext in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / "digits" / f"{name}{ext}", root / "ckpt" / f"{name}{ext}")
    if name == "vq":
        edit(root, 'num_samples = 12\ntokenizer = "builtin:digits/vq"', 'num_samples = 12\ntokenizer = "ckpt/vq"')
    else:
        edit(root, 'priors = { absorbing = "builtin:digits/absorbing" }\n\n[[datasets.fd',
             f'priors = {{ absorbing = "ckpt/{name}" }}\n\n[[datasets.fd')
    return root / "ckpt" / name


def vq_meta(root: Path, fn) -> None:
    stem = ckpt(root)
    meta = json.loads(stem.with_suffix(".json").read_text())
    fn(meta)
    stem.with_suffix(".json").write_text(json.dumps(meta))


def prior_hparams(root: Path, **changes) -> None:
    stem = ckpt(root, "absorbing")
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta["hparams"].update(changes)
    stem.with_suffix(".json").write_text(json.dumps(meta))


def image(root: Path, rel: str, array: np.ndarray | None = None, raw: bytes | None = None) -> Path:
    """An image file at rel: from array (its dtype gives the mode: uint16 I;16, int32 I, float32 F) or raw bytes."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        p.write_bytes(raw)
    else:
        Image.fromarray(array).save(p)
    return p


def lmdb_dataset(root: Path) -> Path:
    """data/db: an LMDB of 40 PNG digits, the training and held-out split of dataset `l`."""
    import lmdb
    env = lmdb.open(str(root / "data" / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, img in enumerate(digits_split("train").images[:40]):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0]).save(buf, format="PNG")
            txn.put(f"{i:04d}".encode(), buf.getvalue())
    env.close()
    append(root, FOLDER_DATASET.replace("datasets.fd", "datasets.l").replace('kind = "folder"', 'kind = "lsun"')
           .replace('"data/train"', '"data/db"').replace('"data/heldout"', '"data/db"'))
    return root / "data" / "db"


def feature_file(root: Path, name: str, **arrays) -> Path:
    base = {"features": np.random.default_rng(0).normal(size=(20, 4)), "extractor": np.array("digits"),
            "weights_sha256": np.array("ab" * 32)}
    p = root / name
    np.savez(p, **{k: v for k, v in {**base, **arrays}.items() if v is not None})
    return p


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(digits_split("train").images[0][..., 0]).resize((64, 64)).save(buf, format="JPEG")
    return buf.getvalue()[:200]


RUN_FD = ("run", "--samplers", "data,absorbing")   # the finished run's plan


# ----------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    args: tuple
    match: str                      # a regex the error line must match (the thing named)
    setup: Callable[[Path], object] | None = None   # changes the project copy before the command
    env: dict = field(default_factory=dict)


CASES = [
    # --- bench.toml: files
    Case("config-not-utf8", ("run",), r"bench\.toml.*UTF-8",
         lambda r: (r / "bench.toml").write_bytes(b"[run]\ndataset = \"\xff\xfe\"\n")),
    Case("config-truncated", ("run",), r"bench\.toml.*not valid TOML",
         lambda r: (r / "bench.toml").write_text((r / "bench.toml").read_text().split('results_dir = "re')[0]
                                                  + 'results_dir = "re')),
    Case("config-a-folder", ("run", "--config", "conf"), r"'--config'.*'conf' is a directory",
         lambda r: (r / "conf").mkdir()),
    Case("config-dangling-symlink", ("run", "--config", "link.toml"), r"config file link\.toml",
         lambda r: (r / "link.toml").symlink_to(r / "nowhere.toml")),
    Case("config-fifo", ("run", "--config", "fifo.toml"), r"config file fifo\.toml.*not a regular file",
         lambda r: os.mkfifo(r / "fifo.toml")),
    # --- bench.toml: keys and values
    Case("config-unknown-top-key", ("run",), r"unknown key 'colour'",
         lambda r: (r / "bench.toml").write_text("colour = 1\n" + (r / "bench.toml").read_text())),
    Case("config-unknown-run-key", ("run",), r"unknown key 'run\.colour'",
         lambda r: edit(r, "[run]\n", "[run]\ncolour = 1\n")),
    Case("config-batch-size-zero", ("run",), r"run\.batch_size must be positive",
         lambda r: edit(r, "batch_size = 250", "batch_size = 0")),
    Case("config-batch-size-string", ("run",), r"run\.batch_size must be an integer",
         lambda r: edit(r, "batch_size = 250", 'batch_size = "many"')),
    Case("config-seed-negative", ("run",), r"run\.seed must lie in 0\.\.", lambda r: edit(r, "seed = 0", "seed = -1")),
    Case("config-seed-huge", ("run",), r"run\.seed must lie in 0\.\..*4294967296",
         lambda r: edit(r, "seed = 0", "seed = 4294967296")),
    Case("config-profile-value", ("run", "--profile", "p"), r"with --profile p: run\.batch_size must be positive",
         lambda r: append(r, "\n[profiles.p.run]\nbatch_size = 0\n")),
    Case("config-train-path-unset-var", ("run",), r"datasets\.fd\.train.*\$\{BENCH_NOT_SET\}",
         lambda r: edit(r, 'train = "data/train"', 'train = "${BENCH_NOT_SET}/train"')),
    Case("config-official-nf-negative", ("run", "--dataset", "o"), r"official hyperparameters.*nf = -32",
         lambda r: append(r, digits_table("o", extra='official_hparams = { dataset = "churches", nf = -32 }\n').replace(
             'tokenizer = "builtin:digits/vq"', 'tokenizer = "o/vqgan_ema_1.th"'))),
    Case("config-pr-k-nan", ("run",), r"metrics\.pr_k must be an integer", lambda r: edit(r, "pr_k = 3", "pr_k = nan")),
    Case("config-kid-subsets-float", ("run",), r"metrics\.kid_subsets must be an integer",
         lambda r: edit(r, "kid_subsets = 100", "kid_subsets = 1.5")),
    Case("config-repeats-zero", ("run",), r"timing\.repeats must be positive",
         lambda r: edit(r, "repeats = 1", "repeats = 0")),
    Case("config-batch-size-huge", ("run",), r"run\.batch_size must be at most 65,536",
         lambda r: edit(r, "batch_size = 250", "batch_size = 1000000000")),
    Case("config-timing-batch-size-huge", ("run",), r"timing\.batch_size must be at most 65,536",
         lambda r: edit(r, "batch_size = 16\n", "batch_size = 1000000000\n")),
    Case("config-warmup-huge", ("run",), r"timing\.warmup must be at most 1,000",
         lambda r: edit(r, "warmup = 0", "warmup = 1000000")),
    Case("config-kid-subsets-huge", ("run",), r"metrics\.kid_subsets must be at most 10,000",
         lambda r: edit(r, "kid_subsets = 100", "kid_subsets = 100000000")),
    Case("config-dataset-batch-size-huge", ("run",), r"datasets\.x\.batch_size must be at most",
         lambda r: append(r, digits_table(extra="batch_size = 100000000\n"))),
    Case("config-device-tpu", ("run",), r"run\.device must be 'cpu' or 'cuda'",
         lambda r: edit(r, 'device = "cpu"', 'device = "tpu"')),
    Case("config-execution-unknown", ("run",), r"run\.execution.*unknown switch 'warp'",
         lambda r: edit(r, 'execution = "plain"', 'execution = "warp"')),
    Case("config-results-dir-unset-var", ("run",), r"run\.results_dir.*\$\{BENCH_NOT_SET\}",
         lambda r: edit(r, 'results_dir = "results"', 'results_dir = "${BENCH_NOT_SET}/results"')),
    Case("config-dataset-name-dotdot", ("run",), r"dataset name '\.\./\.\./x'",
         lambda r: append(r, digits_table("../../x"))),
    Case("config-dataset-name-slash", ("run",), r"dataset name 'a/b'", lambda r: append(r, digits_table("a/b"))),
    Case("config-dataset-name-long", ("run",), r"dataset name 'x{101}'", lambda r: append(r, digits_table("x" * 101))),
    Case("config-prior-key-dotdot", ("run",), r"priors key '\.\./p'",
         lambda r: append(r, digits_table(extra='priors = { "../p" = "builtin:digits/absorbing" }\n').replace(
             'priors = { absorbing = "builtin:digits/absorbing" }\n', "", 1))),
    Case("config-resolution-negative", ("run",), r"datasets\.fd\.resolution must be positive",
         lambda r: edit(r, "resolution = 16\nchannels = 1\nextractor = \"digits\"\nnum_samples = 12",
                        "resolution = -16\nchannels = 1\nextractor = \"digits\"\nnum_samples = 12")),
    Case("config-resolution-huge", ("run",), r"datasets\.x\.resolution must be at most 8,192",
         lambda r: append(r, digits_table().replace("resolution = 16", "resolution = 100000"))),
    Case("config-channels-two", ("run",), r"datasets\.x\.channels must be 1 or 3",
         lambda r: append(r, digits_table().replace("channels = 1", "channels = 2"))),
    Case("config-on-corrupt-unknown", ("run",), r"datasets\.fd\.on_corrupt must be one of",
         lambda r: edit(r, 'heldout = "data/heldout"\n', 'heldout = "data/heldout"\non_corrupt = "maybe"\n')),
    Case("config-heldout-size-too-big", ("run", "--dataset", "x"), r"heldout_size must lie in 1\.\.1796",
         lambda r: append(r, digits_table(extra="heldout_size = 5000\n"))),
    Case("config-official-preset-unknown", ("run",), r"official_hparams.*unknown official preset 'mars'",
         lambda r: append(r, digits_table(extra='official_hparams = "mars"\n'))),
    Case("config-sweep-temperature-nan", ("run",), r"sweep\[0\]\.temperature.*nan",
         lambda r: append(r, digits_table(sweep='sampler = "absorbing"\nsteps = [1]\ntemperature = [nan]\n'))),
    Case("config-sweep-temperature-inf", ("run",), r"sweep\[0\]\.temperature.*inf",
         lambda r: append(r, digits_table(sweep='sampler = "absorbing"\nsteps = [1]\ntemperature = [inf]\n'))),
    Case("config-sweep-top-p-negative", ("run",), r"sweep\[0\].*top_p = -0\.5",
         lambda r: append(r, digits_table(sweep='sampler = "absorbing"\nsteps = [1]\ntop_p = -0.5\n'))),
    Case("config-sweep-top-k-negative", ("run",), r"sweep\[0\].*top_k = -5",
         lambda r: append(r, digits_table(sweep='sampler = "absorbing"\nsteps = [1]\ntop_k = -5\n'))),
    Case("config-sweep-steps-repeated", ("run",), r"sweep\[0\]\.steps = \[2, 2\] repeats",
         lambda r: append(r, digits_table(sweep='sampler = "absorbing"\nsteps = [2, 2]\n'))),
    Case("config-sweep-steps-zero", ("run",), r"sweep\[0\].*steps = 0",
         lambda r: append(r, digits_table(sweep='sampler = "absorbing"\nsteps = [0]\n'))),
    Case("config-sweep-steps-not-taken", ("run",), r"sweep\[0\]\.steps: sampler 'autoregressive' takes no steps",
         lambda r: append(r, digits_table(sweep='sampler = "autoregressive"\nsteps = [4]\n'))),
    Case("config-sweep-top-k-not-taken", ("run",), r"sweep\[0\]: sampler 'random-codes' draws no tokens",
         lambda r: append(r, digits_table(sweep='sampler = "random-codes"\ntop_k = 5\n'))),
    Case("config-sweep-unknown-sampler", ("run",), r"unknown sampler 'diffusion'",
         lambda r: append(r, digits_table(sweep='sampler = "diffusion"\n'))),
    Case("config-threshold-negative", ("run",), r"thresholds\.digits\.fid_regression must be >= 0",
         lambda r: edit(r, "fid_regression = 0.25", "fid_regression = -0.25")),
    Case("config-threshold-ceiling-nan", ("run",), r"thresholds\.digits\.fid_ceiling must be a table of numbers",
         lambda r: edit(r, '"absorbing-s64-t1" = 50.0', '"absorbing-s64-t1" = nan')),
    Case("config-profile-unknown", ("run", "--profile", "fastest"), r"unknown profile 'fastest'"),
    # --- the command line
    Case("run-steps-beyond-tokens", ("run", "--steps", 65), r"steps in 1\.\.64.*got 65"),
    Case("run-steps-repeated", ("run", "--steps", "2,2"), r"--steps.*repeats"),
    Case("run-steps-zero", ("run", "--steps", "0"), r"--steps.*integers >= 1"),
    Case("run-steps-not-a-number", ("run", "--steps", "two"), r"--steps.*integers"),
    Case("run-num-samples-one", ("run", "--num-samples", 1), r"--num-samples 1 is too few"),
    Case("run-num-samples-zero", ("run", "--num-samples", 0), r"--num-samples"),
    Case("run-num-samples-huge", ("run", "--num-samples", 10 ** 12), r"--num-samples 1000000000000 is more"),
    Case("run-run-name-long", ("run", "--run-name", "n" * 300), r"--run-name 'n{300}'.*at most 100"),
    Case("run-run-name-dotdot", ("run", "--run-name", "../../x"), r"--run-name '\.\./\.\./x'"),
    Case("run-run-name-empty", ("run", "--run-name", ""), r"--run-name ''"),
    Case("run-dataset-unknown", ("run", "--dataset", "mnist"), r"unknown dataset 'mnist'"),
    Case("run-dataset-dotdot", ("run", "--dataset", "../fd"), r"unknown dataset '\.\./fd'"),
    Case("run-samplers-empty", ("run", "--samplers", ","), r"nothing to run"),
    Case("run-dataset-empty", ("run", "--dataset", ""), r"unknown dataset ''"),
    Case("run-samplers-unknown", ("run", "--samplers", "teleport"), r"--samplers teleport"),
    Case("run-device-cuda-absent", ("run", "--device", "cuda"), r"--device cuda.*no CUDA"),
    Case("run-execution-unknown", ("run", "--execution", "warp"), r"execution 'warp'"),
    Case("run-resume-and-force", (*RUN_FD, "--run-name", "done", "--resume", "--force"),
         r"--resume and --force"),
    Case("run-finished-without-force", (*RUN_FD, "--run-name", "done"), r"run .*done is finished.*--force"),
    Case("run-force-with-invalid-steps", ("run", "--run-name", "done", "--force", "--steps", 65), r"got 65"),
    Case("run-force-with-invalid-checkpoint", (*RUN_FD, "--run-name", "done", "--force"), r"ckpt/vq\.safetensors",
         lambda r: ckpt(r).with_suffix(".safetensors").write_bytes(b"\0" * 10)),
    Case("run-force-with-missing-data", (*RUN_FD, "--run-name", "done", "--force"), r"data/train does not exist",
         lambda r: shutil.rmtree(r / "data" / "train")),
    Case("run-unfinished-without-resume", (*RUN_FD, "--run-name", "partial"), r"unfinished.*--resume", unfinished),
    Case("run-resume-other-steps", ("run", "--samplers", "data,absorbing", "--steps", 2, "--run-name", "partial",
                                    "--resume"), r"cannot resume .*partial.*rows", unfinished),
    Case("run-resume-other-samplers", ("run", "--samplers", "data", "--run-name", "partial", "--resume"),
         r"cannot resume .*partial.*rows", unfinished),
    Case("run-resume-other-num-samples", (*RUN_FD, "--num-samples", 13, "--run-name", "partial", "--resume"),
         r"cannot resume .*partial.*num_samples", unfinished),
    Case("run-resume-nothing", (*RUN_FD, "--run-name", "never", "--resume"), r"no such run"),
    Case("run-resume-corrupt-manifest", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"manifest .*partial/manifest\.json.*not valid",
         lambda r: (unfinished(r) / "manifest.json").write_text('{"dataset": "fd", ')),
    Case("run-resume-manifest-a-list", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"manifest .*partial/manifest\.json must hold a JSON object",
         lambda r: (unfinished(r) / "manifest.json").write_text("[]")),
    Case("run-resume-manifest-a-folder", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"manifest .*partial/manifest\.json is not a regular file",
         lambda r: ((unfinished(r) / "manifest.json").unlink(), (r / "results/fd/partial/manifest.json").mkdir())),
    Case("run-resume-manifest-not-utf8", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"manifest .*partial/manifest\.json is not valid UTF-8",
         lambda r: (unfinished(r) / "manifest.json").write_bytes(b'{"dataset": "\xff"}')),
    Case("run-over-published", ("run", "--samplers", "data", "--run-name", "paper", "--force"), r"published",
         lambda r: shutil.copytree(r / "results/churches/paper", r / "results/fd/paper")),
    Case("run-resume-corrupt-row", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"row file .*rows/data\.json.*not valid",
         lambda r: (unfinished(r) / "rows" / "data.json").write_bytes(b'{"slug": "da')),
    Case("run-resume-row-of-another-slug", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"row file .*rows/data\.json holds row 'absorbing-s1-t1'",
         lambda r: shutil.copy(unfinished(r) / "rows" / "absorbing-s1-t1.json", r / "results/fd/partial/rows/data.json")),
    Case("run-resume-row-fid-string", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"rows/data\.json.*fid = 'low'",
         lambda r: (unfinished(r) / "rows" / "data.json").write_text('{"slug": "data", "fid": "low"}')),
    # --- the run folder and the results folder
    Case("run-folder-is-a-file-resume", (*RUN_FD, "--run-name", "f", "--resume"), r"results/fd/f exists and is not a folder",
         lambda r: (r / "results" / "fd" / "f").write_text("x")),
    Case("run-folder-is-a-file-force", (*RUN_FD, "--run-name", "f", "--force"), r"results/fd/f exists and is not a folder",
         lambda r: (r / "results" / "fd" / "f").write_text("x")),
    Case("run-folder-is-a-dangling-symlink-resume", (*RUN_FD, "--run-name", "l", "--resume"),
         r"results/fd/l exists and is not a folder", lambda r: (r / "results" / "fd" / "l").symlink_to(r / "nowhere")),
    Case("run-resume-manifest-missing", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"manifest .*partial/manifest\.json not found", lambda r: (unfinished(r) / "manifest.json").unlink()),
    Case("run-resume-row-a-folder", (*RUN_FD, "--run-name", "partial", "--resume"),
         r"row file .*rows/data\.json is not a regular file",
         lambda r: ((unfinished(r) / "rows" / "data.json").unlink(), (r / "results/fd/partial/rows/data.json").mkdir())),
    Case("run-heldout-dangling-symlink", ("run",), r"data/heldout does not exist",
         lambda r: (shutil.rmtree(r / "data" / "heldout"), (r / "data" / "heldout").symlink_to(r / "nowhere"))),
    Case("run-folder-is-a-symlink-force", (*RUN_FD, "--run-name", "l", "--force"), r"results/fd/l exists and is not a folder",
         lambda r: (r / "results" / "fd" / "l").symlink_to(r / "results" / "fd" / "done")),
    Case("run-results-dir-is-a-file", ("run",), r"notes\.txt is a file, not a folder",
         lambda r: (edit(r, 'results_dir = "results"', 'results_dir = "notes.txt"'), (r / "notes.txt").write_text("x"))),
    Case("run-results-dir-under-a-file", ("run",), r"notes\.txt/results/fd/.*notes\.txt is a file, not a folder",
         lambda r: (edit(r, 'results_dir = "results"', 'results_dir = "notes.txt/results"'),
                    (r / "notes.txt").write_text("x"))),
    Case("run-results-dir-name-too-long", ("run",), r"longer than 255 bytes",
         lambda r: edit(r, 'results_dir = "results"', f'results_dir = "{"r" * 300}"')),
    Case("run-cache-dir-name-too-long", ("run",), r"run\.cache_dir.*longer than 255 bytes",
         lambda r: edit(r, 'cache_dir = "cache"', f'cache_dir = "{"c" * 300}"')),
    Case("run-cache-hashes-a-folder", ("run", "--samplers", "data"), r"cache/content-hashes\.json",
         lambda r: ((r / "cache" / "content-hashes.json").unlink(), (r / "cache" / "content-hashes.json").mkdir())),
    Case("run-cache-reference-a-folder", ("run", "--samplers", "data"), r"cache/reference/fd-\w+\.npy",
         lambda r: [(f.unlink(), f.mkdir()) for f in (r / "cache" / "reference").glob("fd-*.npy")]),
    Case("run-cache-dir-under-a-file", ("run", "--run-name", "c"), r"notes\.txt/cache.*notes\.txt is a file",
         lambda r: (edit(r, 'cache_dir = "cache"', 'cache_dir = "notes.txt/cache"'), (r / "notes.txt").write_text("x"))),
    Case("run-dataset-path-too-long", ("run",), r"data/t{300}.*too long",
         lambda r: edit(r, 'train = "data/train"', f'train = "data/{"t" * 300}"')),
    Case("config-path-too-long", ("run", "--config", "c" * 300 + ".toml"), r"c{300}\.toml.*too long"),
    Case("score-path-too-long", ("score", "a" * 300 + ".npz", "b.npz"), r"a{300}\.npz.*too long"),
    Case("features-images-dir-too-long", ("features", "i" * 300, "--extractor", "digits", "--out", "f.npz"),
         r"i{300}.*too long"),
    Case("check-run-path-too-long", ("check", "r" * 300), r"r{300}"),
    Case("run-dataset-folder-is-a-file", ("run",), r"data/train is not a directory",
         lambda r: (shutil.rmtree(r / "data" / "train"), (r / "data" / "train").write_text("x"))),
    Case("run-dataset-folder-empty", ("run",), r"data/train holds no images",
         lambda r: [p.unlink() for p in (r / "data" / "train").iterdir()]),
    Case("run-lmdb-not-an-lmdb", ("run", "--dataset", "l"), r"data/notlmdb.*not an LMDB",
         lambda r: ((r / "data" / "notlmdb").write_text("x"), append(r, FOLDER_DATASET.replace(
             "datasets.fd", "datasets.l").replace('kind = "folder"', 'kind = "lsun"').replace(
             '"data/train"', '"data/notlmdb"')))),
    Case("run-lmdb-truncated", ("run", "--dataset", "l"), r"LMDB data/db is truncated",
         lambda r: (lambda f: f.write_bytes(f.read_bytes()[:9000]))(lmdb_dataset(r) / "data.mdb")),
    Case("run-lmdb-one-page", ("run", "--dataset", "l"), r"data/db",
         lambda r: (lambda f: f.write_bytes(f.read_bytes()[:3000]))(lmdb_dataset(r) / "data.mdb")),
    Case("run-lmdb-corrupt-page", ("run", "--dataset", "l"), r"LMDB data/db .*corrupt",
         lambda r: (lambda f: f.write_bytes(f.read_bytes()[:8192] + b"\xff" * (len(f.read_bytes()) - 8192)))(
             lmdb_dataset(r) / "data.mdb")),
    # --- images
    Case("image-16-bit-png", ("run", "--samplers", "data"), r"data/train/zz\.png.*mode 'I(;16)?'.*8-bit",
         lambda r: image(r, "data/train/zz.png", np.full((16, 16), 40000, np.uint16))),
    Case("image-32-bit-int-tiff", ("run", "--samplers", "data"), r"data/train/zz\.tif.*mode 'I'",
         lambda r: image(r, "data/train/zz.tif", np.full((16, 16), 70000, np.int32))),
    Case("image-float-tiff", ("run", "--samplers", "data"), r"data/train/zz\.tiff.*mode 'F'",
         lambda r: image(r, "data/train/zz.tiff", np.full((16, 16), 0.5, np.float32))),
    Case("image-truncated-jpeg", ("run", "--samplers", "data"), r"data/train/zz\.jpg",
         lambda r: image(r, "data/train/zz.jpg", raw=truncated_jpeg())),
    Case("image-dangling-symlink", ("run", "--samplers", "data"), r"data/train/zz\.png is not a regular file",
         lambda r: (r / "data" / "train" / "zz.png").symlink_to(r / "gone.png")),
    Case("image-fifo", ("run", "--samplers", "data"), r"data/heldout/zz\.png is not a regular file",
         lambda r: os.mkfifo(r / "data" / "heldout" / "zz.png")),
    Case("image-not-an-image", ("run", "--samplers", "data"), r"data/train/zz\.png",
         lambda r: image(r, "data/train/zz.png", raw=b"hello, not a png")),
    # --- checkpoints
    Case("ckpt-reference-empty", ("run",), r"datasets\.fd\.tokenizer is empty",
         lambda r: edit(r, 'num_samples = 12\ntokenizer = "builtin:digits/vq"', 'num_samples = 12\ntokenizer = ""')),
    Case("ckpt-reference-a-folder", ("run",), r"checkpoint 'ckpt/\.\.' names no file",
         lambda r: edit(r, 'num_samples = 12\ntokenizer = "builtin:digits/vq"', 'num_samples = 12\ntokenizer = "ckpt/.."')),
    Case("ckpt-truncated", ("run",), r"ckpt/vq\.safetensors.*truncated",
         lambda r: (lambda s: s.write_bytes(s.read_bytes()[:5000]))(ckpt(r).with_suffix(".safetensors"))),
    Case("ckpt-tensors-a-folder", ("run",), r"ckpt/vq\.safetensors",
         lambda r: (lambda s: (s.unlink(), s.mkdir()))(ckpt(r).with_suffix(".safetensors"))),
    Case("ckpt-json-not-utf8", ("run",), r"ckpt/vq\.json.*UTF-8",
         lambda r: ckpt(r).with_suffix(".json").write_bytes(b'{"kind": "vq\xff"}')),
    Case("ckpt-json-a-list", ("run",), r"ckpt/vq\.json must hold a JSON object",
         lambda r: ckpt(r).with_suffix(".json").write_text("[1, 2]")),
    Case("ckpt-json-no-hparams", ("run",), r"ckpt/vq\.json.*hparams", lambda r: vq_meta(r, lambda m: m.pop("hparams"))),
    Case("ckpt-json-hparams-a-list", ("run",), r"ckpt/vq\.json.*hparams",
         lambda r: vq_meta(r, lambda m: m.update(hparams=[1, 2]))),
    Case("ckpt-hparam-wrong-type", ("run",), r"ckpt/vq.*codebook_size.*'64'",
         lambda r: vq_meta(r, lambda m: m["hparams"].update(codebook_size="64"))),
    Case("ckpt-hparam-float", ("run",), r"ckpt/vq.*emb_dim.*32\.5",
         lambda r: vq_meta(r, lambda m: m["hparams"].update(emb_dim=32.5))),
    Case("ckpt-hparam-negative", ("run",), r"ckpt/vq.*codebook_size.*-64",
         lambda r: vq_meta(r, lambda m: m["hparams"].update(codebook_size=-64))),
    Case("ckpt-hparam-unknown", ("run",), r"ckpt/vq.*colour",
         lambda r: vq_meta(r, lambda m: m["hparams"].update(colour="red"))),
    Case("ckpt-heads-do-not-divide-width", ("run", "--samplers", "absorbing"), r"ckpt/absorbing\.json.*Transformer",
         lambda r: prior_hparams(r, n_head=5)),
    Case("ckpt-dropout-above-one", ("run", "--samplers", "absorbing"), r"ckpt/absorbing\.json.*Transformer",
         lambda r: prior_hparams(r, resid_pdrop=1.5)),
    Case("ckpt-kind-mismatch", ("run",), r"ckpt/vq\.json holds a 'absorbing' model, expected 'vq'",
         lambda r: vq_meta(r, lambda m: m.update(kind="absorbing"))),
    Case("ckpt-prior-hparam-wrong-type", ("run", "--samplers", "absorbing"), r"ckpt/absorbing\.json.*n_layers",
         lambda r: prior_hparams(r, n_layers="four")),
    Case("ckpt-official-truncated", ("run", "--dataset", "o"), r"o/vqgan_ema_1\.th",
         lambda r: ((r / "o").mkdir(), (r / "o" / "vqgan_ema_1.th").write_bytes(
             (OFFICIAL / "vqgan_ema_1.th").read_bytes()[:3000]),
             append(r, digits_table("o", extra='official_hparams = "churches"\n').replace(
                 'tokenizer = "builtin:digits/vq"', 'tokenizer = "o/vqgan_ema_1.th"')))),
    # --- stored results: bench check, figures, compare
    Case("results-truncated-check", ("check", "results/fd/done"), r"results/fd/done/results\.json.*not valid",
         lambda r: results_json(r, raw=(r / "results/fd/done/results.json").read_bytes()[:300])),
    Case("results-a-list-figures", ("figures", "results/fd/done"), r"results\.json must hold an object",
         lambda r: results_json(r, raw=b"[]")),
    Case("results-no-rows-compare", ("compare", "results/fd/done", "results/fd/done"), r"results\.json.*`rows`",
         lambda r: results_json(r, lambda d: d.pop("rows"))),
    Case("results-row-without-slug", ("figures", "results/fd/done"), r"results\.json.*no `slug`",
         lambda r: results_json(r, first_row(lambda row: row.pop("slug")))),
    Case("results-fid-a-string", ("check", "results/fd/done"), r"results\.json.*fid = 'low'",
         lambda r: results_json(r, first_row(lambda row: row.update(fid="low")))),
    Case("results-fid-nan", ("compare", "results/fd/done", "results/fd/done"), r"results\.json.*fid = nan",
         lambda r: results_json(r, first_row(lambda row: row.update(fid=float("nan"))))),
    Case("results-fid-bool", ("figures", "results/fd/done"), r"results\.json.*fid = True",
         lambda r: results_json(r, first_row(lambda row: row.update(fid=True)))),
    Case("results-not-utf8", ("figures", "results/fd/done"), r"results\.json.*UTF-8",
         lambda r: results_json(r, raw=b'{"manifest": "\xff"}')),
    Case("results-unknown-row-key", ("figures", "results/fd/done"), r"unknown row key 'colour'",
         lambda r: results_json(r, first_row(lambda row: row.update(colour="red")))),
    Case("results-duplicate-slug", ("figures", "results/fd/done"), r"two rows share a slug",
         lambda r: results_json(r, lambda d: d["rows"].append(d["rows"][0]))),
    Case("results-manifest-a-string", ("check", "results/fd/done"), r"results\.json must hold an object",
         lambda r: results_json(r, lambda d: d.update(manifest="x"))),
    Case("results-manifest-without-dataset", ("figures", "results/fd/done"), r"manifest lacks `dataset`",
         lambda r: results_json(r, lambda d: d["manifest"].pop("dataset"))),
    Case("results-manifest-num-samples-string", ("check", "results/fd/done"), r"manifest `num_samples` = 'many'",
         lambda r: results_json(r, lambda d: d["manifest"].update(num_samples="many"))),
    Case("results-manifest-reference-a-string", ("figures", "results/fd/done"), r"manifest `reference` = 'x'",
         lambda r: results_json(r, lambda d: d["manifest"].update(reference="x"))),
    Case("check-damaged-baseline", ("check", "results/fd/done", "--baseline", "results/fd/base"),
         r"results/fd/base/results\.json.*not valid",
         lambda r: (shutil.copytree(r / "results/fd/done", r / "results/fd/base"),
                    (r / "results/fd/base/results.json").write_text('{"manifest": {'),
                    append(r, '\n[thresholds.fd]\nfid_regression = 0.25\n'))),
    Case("figures-published", ("figures", "results/churches/paper"), r"published"),
    Case("compare-other-dataset", ("compare", "results/digits/baseline", "results/churches/paper"),
         r"different datasets"),
    Case("compare-published-other-dataset", ("compare", "results/churches/paper", "results/fd/done"),
         r"different datasets"),
    Case("compare-other-protocol", ("compare", "results/fd/done", "results/fd/other"), r"different protocols.*--allow-mismatch",
         lambda r: (shutil.copytree(r / "results/fd/done", r / "results/fd/other"), results_json(
             r, lambda d: d["manifest"].update(num_samples=13), run="other"))),
    Case("results-json-a-folder", ("figures", "results/fd/done"), r"no finished run at 'results/fd/done'",
         lambda r: ((r / "results/fd/done/results.json").unlink(), (r / "results/fd/done/results.json").mkdir())),
    Case("check-no-run", ("check", "results/fd/nothing"), r"no finished run at 'results/fd/nothing'"),
    # --- bench sample
    Case("sample-temperature-nan", ("sample", "--sampler", "absorbing", "--steps", 1, "--temperature", "nan",
                                    "--out", "s.npz"), r"temperature = nan"),
    Case("sample-temperature-inf", ("sample", "--sampler", "absorbing", "--steps", 1, "--temperature", "inf",
                                    "--out", "s.npz"), r"temperature = inf"),
    Case("sample-temperature-negative", ("sample", "--sampler", "absorbing", "--steps", 1, "--temperature", -1,
                                         "--out", "s.npz"), r"temperature = -1"),
    Case("sample-top-p-nan", ("sample", "--sampler", "absorbing", "--steps", 1, "--top-p", "nan", "--out", "s.npz"),
         r"top_p = nan"),
    Case("sample-top-p-above-one", ("sample", "--sampler", "absorbing", "--steps", 1, "--top-p", 1.5,
                                    "--out", "s.npz"), r"top_p = 1\.5"),
    Case("sample-top-k-negative", ("sample", "--sampler", "absorbing", "--steps", 1, "--top-k", -5, "--out", "s.npz"),
         r"top_k = -5"),
    Case("sample-steps-beyond-tokens", ("sample", "--sampler", "absorbing", "--steps", 65, "--out", "s.npz"), r"got 65"),
    Case("sample-out-exists", ("sample", "--sampler", "absorbing", "--steps", 1, "--out", "s.npz"),
         r"s\.npz exists.*--force", lambda r: (r / "s.npz").write_text("x")),
    Case("sample-out-under-a-file", ("sample", "--sampler", "absorbing", "--steps", 1, "--out", "notes.txt/s.npz"),
         r"notes\.txt.*not a folder", lambda r: (r / "notes.txt").write_text("x")),
    Case("sample-out-a-symlink", ("sample", "--sampler", "absorbing", "--steps", 1, "--out", "s.npz", "--force"),
         r"s\.npz is a folder or a symlink", lambda r: (r / "s.npz").symlink_to(r / "bench.toml")),
    Case("sample-num-huge", ("sample", "--sampler", "absorbing", "--steps", 1, "--num", 10 ** 12, "--out", "s.npz"),
         r"--num"),
    Case("sample-seed-negative", ("sample", "--sampler", "absorbing", "--steps", 1, "--seed", -1, "--out", "s.npz"),
         r"'--seed'"),
    Case("sample-out-name-too-long", ("sample", "--sampler", "absorbing", "--steps", 1, "--out", "s" * 300 + ".npz"),
         r"longer than 255 bytes"),
    Case("sample-steps-not-taken", ("sample", "--sampler", "autoregressive", "--steps", 4, "--out", "s.npz"),
         r"'autoregressive' takes no --steps"),
    Case("sample-top-k-not-taken", ("sample", "--sampler", "random-codes", "--top-k", 4, "--out", "s.npz"),
         r"'random-codes' draws no tokens"),
    Case("sample-batch-size-huge", ("sample", "--sampler", "absorbing", "--steps", 1, "--batch-size", 10 ** 9,
                                    "--out", "s.npz"), r"'--batch-size'"),
    Case("sample-unknown-sampler", ("sample", "--sampler", "teleport", "--out", "s.npz"), r"unknown sampler 'teleport'"),
    # --- bench features
    Case("features-empty-folder", ("features", "imgs", "--extractor", "digits", "--out", "f.npz"), r"imgs holds no images",
         lambda r: (r / "imgs").mkdir()),
    Case("features-16-bit", ("features", "imgs", "--extractor", "digits", "--out", "f.npz"), r"imgs/a\.png.*I;16",
         lambda r: image(r, "imgs/a.png", np.full((16, 16), 1000, np.uint16))),
    Case("features-float-tiff", ("features", "imgs", "--extractor", "digits", "--out", "f.npz"), r"imgs/a\.tif.*'F'",
         lambda r: image(r, "imgs/a.tif", np.zeros((16, 16), np.float32))),
    Case("features-truncated-jpeg", ("features", "imgs", "--extractor", "digits", "--out", "f.npz"), r"imgs/a\.jpg",
         lambda r: image(r, "imgs/a.jpg", raw=truncated_jpeg())),
    Case("features-out-exists", ("features", "data/train", "--extractor", "digits", "--out", "f.npz"),
         r"f\.npz exists.*--force", lambda r: (r / "f.npz").write_text("x")),
    Case("features-out-under-a-file", ("features", "data/train", "--extractor", "digits", "--out", "notes.txt/f.npz"),
         r"notes\.txt.*not a folder", lambda r: (r / "notes.txt").write_text("x")),
    Case("features-images-dir-a-file", ("features", "bench.toml", "--extractor", "digits", "--out", "f.npz"),
         r"'bench\.toml' is a file"),
    Case("features-weights-bad-hparams", ("features", "data/train", "--extractor", "digits", "--weights", "ckpt/extractor",
                                          "--out", "f.npz"), r"ckpt/extractor\.json.*DigitsNet",
         lambda r: (lambda s: s.with_suffix(".json").write_text(json.dumps(
             {**json.loads(s.with_suffix(".json").read_text()), "hparams": {"width": "wide"}})))(ckpt(r, "extractor"))),
    Case("features-dangling-symlink", ("features", "data/train", "--extractor", "digits", "--out", "f.npz"),
         r"data/train/zz\.png is not a regular file", lambda r: (r / "data" / "train" / "zz.png").symlink_to(r / "gone")),
    Case("features-inception-weights-text", ("features", "data/train", "--extractor", "inception-v3-compat",
                                             "--out", "f.npz"), r"Inception weights .*w\.pt",
         lambda r: (r / "w.pt").write_text("weights"), env={"BENCH_INCEPTION_WEIGHTS": "w.pt"}),
    Case("features-inception-weights-missing", ("features", "data/train", "--extractor", "inception-v3-compat",
                                                "--out", "f.npz"), r"Inception weights file w\.pt .*does not exist",
         env={"BENCH_INCEPTION_WEIGHTS": "w.pt"}),
    Case("features-clip-weights-text", ("features", "data/train", "--extractor", "clip", "--out", "f.npz"),
         r"clip extractor weights w\.pt", lambda r: (r / "w.pt").write_text("weights"),
         env={"BENCH_CLIP_WEIGHTS": "w.pt"}),
    Case("features-resolution-huge", ("features", "data/train", "--extractor", "inception-v3-compat", "--resolution",
                                      10 ** 6, "--out", "f.npz"), r"'--resolution'"),
    Case("features-resolution-not-the-extractors", ("features", "data/train", "--extractor", "digits", "--resolution",
                                                    64, "--out", "f.npz"), r"'digits' takes 16px.*--resolution 64"),
    Case("features-device-cuda-absent", ("features", "data/train", "--extractor", "digits", "--device", "cuda",
                                         "--out", "f.npz"), r"--device cuda.*no CUDA"),
    Case("perf-device-cuda-absent", ("perf", "--device", "cuda", "--out", "p"), r"--device cuda.*no CUDA"),
    Case("sample-device-cuda-absent", ("sample", "--sampler", "absorbing", "--steps", 1, "--device", "cuda",
                                       "--out", "s.npz"), r"--device cuda.*no CUDA"),
    Case("features-unknown-extractor", ("features", "data/train", "--extractor", "eyes", "--out", "f.npz"), r"'eyes'"),
    # --- bench score
    Case("score-npy", ("score", "a.npy", "b.npz"), r"a\.npy is a \.npy array",
         lambda r: (np.save(r / "a.npy", np.zeros((20, 4))), feature_file(r, "b.npz"))),
    Case("score-string-features", ("score", "a.npz", "b.npz"), r"a\.npz.*real numbers",
         lambda r: (feature_file(r, "a.npz", features=np.array([["x"] * 4] * 20)), feature_file(r, "b.npz"))),
    Case("score-nan-features", ("score", "a.npz", "b.npz"), r"NaN or inf",
         lambda r: (feature_file(r, "a.npz", features=np.full((20, 4), np.nan)), feature_file(r, "b.npz"))),
    Case("score-one-dimensional", ("score", "a.npz", "b.npz"), r"a\.npz.*2-d",
         lambda r: (feature_file(r, "a.npz", features=np.zeros(20)), feature_file(r, "b.npz"))),
    Case("score-missing-keys", ("score", "a.npz", "b.npz"), r"a\.npz lacks extractor",
         lambda r: (feature_file(r, "a.npz", extractor=None), feature_file(r, "b.npz"))),
    Case("score-object-array", ("score", "a.npz", "b.npz"), r"a\.npz",
         lambda r: (np.savez(r / "a.npz", features=np.array([None] * 20, dtype=object), extractor=np.array("digits"),
                             weights_sha256=np.array("ab")), feature_file(r, "b.npz"))),
    Case("score-text-file", ("score", "a.npz", "b.npz"), r"a\.npz is not a readable \.npz",
         lambda r: ((r / "a.npz").write_text("features"), feature_file(r, "b.npz"))),
    Case("score-missing-file", ("score", "a.npz", "b.npz"), r"a\.npz not found", lambda r: feature_file(r, "b.npz")),
    Case("score-other-extractors", ("score", "a.npz", "b.npz"), r"'clip' features.*same extractor",
         lambda r: (feature_file(r, "a.npz", extractor=np.array("clip")), feature_file(r, "b.npz"))),
    Case("score-other-dimensions", ("score", "a.npz", "b.npz"), r"differ in dimension",
         lambda r: (feature_file(r, "a.npz", features=np.zeros((20, 3))), feature_file(r, "b.npz"))),
    Case("score-too-few-samples", ("score", "a.npz", "b.npz"), r"at least \d+ samples",
         lambda r: (feature_file(r, "a.npz", features=np.ones((1, 4))), feature_file(r, "b.npz"))),
    # --- bench train
    Case("train-shipped-without-flag", ("train", "--model", "extractor", "--steps", 1), r"shipped.*--replace-shipped"),
    Case("train-out-in-weights", ("train", "--model", "vq", "--steps", 1, "--out", WEIGHTS_DIR / "digits" / "mine"),
         r"shipped.*--replace-shipped"),
    Case("train-out-under-a-file", ("train", "--model", "extractor", "--steps", 1, "--out", "notes.txt/x"),
         r"notes\.txt", lambda r: (r / "notes.txt").write_text("x")),
    Case("train-out-name-too-long", ("train", "--model", "extractor", "--steps", 1, "--out", "m" * 300),
         r"longer than 255 bytes"),
    Case("train-seed-negative", ("train", "--model", "extractor", "--seed", -3, "--out", "m"), r"'--seed'"),
    Case("train-threads-huge", ("train", "--model", "extractor", "--threads", 10 ** 6, "--out", "m"), r"'--threads'"),
    Case("train-resume-garbage", ("train", "--model", "absorbing", "--out", "m", "--resume", "--steps", 1),
         r"resume state m\.resume\.pt is unreadable", lambda r: (r / "m.resume.pt").write_text("state")),
    Case("train-resume-foreign", ("train", "--model", "absorbing", "--out", "m", "--resume", "--steps", 1),
         r"resume state m\.resume\.pt is not one `bench train` wrote",
         lambda r: __import__("torch").save({"step": 3}, r / "m.resume.pt")),
    Case("train-unknown-model", ("train", "--model", "gan", "--out", "m"), r"--model 'gan'"),
    Case("train-not-digits", ("train", "--dataset", "fd", "--model", "vq", "--out", "m"), r"digits data only"),
    # --- bench convert
    Case("convert-out-under-a-file", ("convert", "--from", "official-ut", "--vqgan", OFFICIAL / "vqgan_ema_1.th",
                                      "--hparams", OFFICIAL / "hparams.json", "--out", "notes.txt/c"),
         r"notes\.txt", lambda r: (r / "notes.txt").write_text("x")),
    Case("convert-out-exists", ("convert", "--from", "official-ut", "--vqgan", OFFICIAL / "vqgan_ema_1.th",
                                "--hparams", OFFICIAL / "hparams.json", "--out", "c"), r"c/vq\.safetensors exists.*--force",
         lambda r: ((r / "c").mkdir(), (r / "c" / "vq.safetensors").write_text("x"))),
    Case("convert-hparams-not-utf8", ("convert", "--from", "official-ut", "--vqgan", OFFICIAL / "vqgan_ema_1.th",
                                      "--hparams", "h.json", "--out", "c"), r"h\.json",
         lambda r: (r / "h.json").write_bytes(b'{"nf": "\xff"}')),
    Case("convert-hparams-a-list", ("convert", "--from", "official-ut", "--vqgan", OFFICIAL / "vqgan_ema_1.th",
                                    "--hparams", "h.json", "--out", "c"), r"h\.json must hold a JSON object",
         lambda r: (r / "h.json").write_text("[]")),
    Case("convert-hparam-wrong-type", ("convert", "--from", "official-ut", "--vqgan", OFFICIAL / "vqgan_ema_1.th",
                                       "--hparams", "h.json", "--out", "c"), r"'nf' must be an integer",
         lambda r: (r / "h.json").write_text('{"dataset": "churches", "nf": "wide"}')),
    Case("convert-vqgan-missing", ("convert", "--from", "official-ut", "--vqgan", "none.th", "--preset", "churches",
                                   "--out", "c"), r"none\.th"),
    Case("convert-vqgan-text", ("convert", "--from", "official-ut", "--vqgan", "v.th", "--preset", "churches",
                                "--out", "c"), r"v\.th", lambda r: (r / "v.th").write_text("not a checkpoint")),
    # --- bench perf
    Case("perf-out-exists", ("perf", "--no-features", "--steps", 1, "--out", "p"), r"p already holds perf results.*--force",
         lambda r: ((r / "p").mkdir(), (r / "p" / "results.json").write_text("{}"))),
    Case("perf-out-a-file", ("perf", "--no-features", "--steps", 1, "--out", "p"), r"'--out'.*'p' is a file",
         lambda r: (r / "p").write_text("x")),
    Case("perf-out-under-a-file", ("perf", "--no-features", "--steps", 1, "--out", "notes.txt/p"), r"notes\.txt",
         lambda r: (r / "notes.txt").write_text("x")),
    Case("perf-batch-size-zero", ("perf", "--batch-size", 0, "--out", "p"), r"--batch-size"),
    Case("perf-batch-size-huge", ("perf", "--batch-size", 10 ** 9, "--out", "p"), r"'--batch-size'.*65536"),
    Case("perf-repeats-huge", ("perf", "--repeats", 10 ** 9, "--out", "p"), r"'--repeats'"),
    Case("perf-steps-beyond-tokens", ("perf", "--no-features", "--steps", 65, "--out", "p"), r"got 65"),
    # --- torchrun's environment
    Case("env-world-size-not-a-number", ("run",), r"WORLD_SIZE='two'", env={"WORLD_SIZE": "two"}),
    Case("env-world-size-zero", ("run",), r"WORLD_SIZE=0 is outside 1\.\.", env={"WORLD_SIZE": "0"}),
    Case("env-world-size-negative", ("run",), r"WORLD_SIZE=-2 is outside 1\.\.", env={"WORLD_SIZE": "-2"}),
    Case("env-rank-beyond-world", ("run",), r"RANK=5 is outside 0\.\.1", env={"WORLD_SIZE": "2", "RANK": "5"}),
    Case("env-rank-negative", ("run",), r"RANK=-1 is outside 0\.\.1", env={"WORLD_SIZE": "2", "RANK": "-1"}),
    Case("env-rank-not-a-number", ("run",), r"RANK='1\.5' is not an integer", env={"WORLD_SIZE": "2", "RANK": "1.5"}),
    Case("env-local-rank-negative", ("run",), r"LOCAL_RANK=-1 is outside 0\.\.1",
         env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}),
    Case("env-local-rank-beyond-local-world", ("run",), r"LOCAL_RANK=2 is outside 0\.\.1",
         env={"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}),
    Case("env-rank-missing", ("run",), r"RANK is not set", env={"WORLD_SIZE": "2"}),
    Case("env-master-port-not-a-number", ("run",), r"MASTER_PORT='http'",
         env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}),
    Case("env-master-addr-missing", ("run",), r"MASTER_ADDR",
         env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}),
]

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    if case.setup is not None:
        case.setup(root)
    before = snapshot(root), snapshot(WEIGHTS_DIR, hash_files=False)
    code, out, caught = invoke(*case.args, env=case.env)
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and len(lines) == 1, out
    assert re.search(case.match, errors[0]), (case.match, errors[0])
    assert not caught, caught
    assert changes(before[0], snapshot(root)) == []
    assert changes(before[1], snapshot(WEIGHTS_DIR, hash_files=False)) == []


# ----------------------------------------------------------------------------- accepted, not refused

@pytest.fixture
def project(base, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def _rows(run: Path) -> dict:
    return {r["slug"]: r for r in json.loads((run / "results.json").read_text())["rows"]}


def test_a_truncated_reference_cache_is_recomputed(project):
    (cache,) = (project / "cache" / "reference").glob("fd-*.npy")
    cache.write_bytes(cache.read_bytes()[:100])
    code, out, _ = invoke("run", "--samplers", "data", "--run-name", "again", "--quiet")
    assert code == 0, out
    assert np.load(cache).shape == (30, 128)
    assert _rows(project / "results/fd/again")["data"]["fid"] == _rows(project / "results/fd/done")["data"]["fid"]


def test_an_unreadable_shard_is_recomputed_on_resume(project, monkeypatch):
    from bench.results import ShardStore
    loaded, load = [], ShardStore.load
    monkeypatch.setattr(ShardStore, "load", lambda self, *a: loaded.append(load(self, *a)) or loaded[-1])
    run = unfinished(project)
    (run / "rows" / "absorbing-s1-t1.json").unlink()
    shards = ShardStore(run / "rows" / "absorbing-s1-t1.shards", 250)
    shards.save(0, np.zeros((12, 128)), {})
    (shard,) = shards.folder.iterdir()
    shard.write_bytes(shard.read_bytes()[:50])
    code, out, _ = invoke(*RUN_FD, "--run-name", "partial", "--resume", "--quiet")
    assert code == 0, out
    assert loaded == [None] and not shards.folder.exists()  # the shard was looked at, refused, and redone
    assert _rows(run)["absorbing-s1-t1"]["fid"] == _rows(project / "results/fd/done")["absorbing-s1-t1"]["fid"]


def test_a_damaged_hash_cache_is_rebuilt(project):
    (project / "cache" / "content-hashes.json").write_text('{"not": ')
    code, out, _ = invoke("run", "--samplers", "data", "--run-name", "again", "--quiet")
    assert code == 0, out
    assert len(json.loads((project / "cache" / "content-hashes.json").read_text())) == 42  # 30 + 12 images


def test_tilde_in_results_and_cache_dir_is_the_home_folder(project, monkeypatch):
    from bench.config import load_config
    monkeypatch.setenv("HOME", str(project / "home"))
    edit(project, 'results_dir = "results"', 'results_dir = "~/x"')
    edit(project, 'cache_dir = "cache"', 'cache_dir = "~/c"')
    cfg = load_config()
    assert cfg.results_dir() == project / "home" / "x" and cfg.cache_dir() == project / "home" / "c"


def test_a_row_without_fid_is_shown_empty_and_fails_its_ceiling(project):
    """Unknown values are empty, never invented: tables and comparisons show them so; a ceiling set
    for a row without a FID is a breach (exit 1), not bad input."""
    results_json(project, lambda d: [r.pop("fid") for r in d["rows"] if r["slug"] == "absorbing-s1-t1"])
    append(project, '\n[thresholds.fd]\nfid_ceiling = { "absorbing-s1-t1" = 1000.0 }\n')
    code, out, _ = invoke("figures", "results/fd/done")
    assert code == 0, out
    code, out, _ = invoke("compare", "results/fd/done", "results/fd/done")
    assert code == 0, out
    code, out, _ = invoke("check", "results/fd/done")
    assert code == 1 and "FAILED: absorbing-s1-t1: the row has no FID" in out, out


def test_a_bad_held_out_image_writes_no_run_and_keeps_the_training_splits_cache(project):
    """The held-out split is read by the first rows, after the training split's reference features:
    those are kept (they are valid and keyed by the training split's content); no run is written."""
    image(project, "data/heldout/zz.jpg", raw=truncated_jpeg())
    before = snapshot(project)
    code, out, _ = invoke(*RUN_FD, "--run-name", "new")
    assert code == 2 and out.strip() == out.strip().splitlines()[0] and "data/heldout/zz.jpg" in out, out
    assert all(c.startswith(f"changed {project / 'cache'}") for c in changes(before, snapshot(project)))


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "PNG"),
                                      ("RGBA", "PNG"), ("CMYK", "TIFF"), ("YCbCr", "TIFF"), ("L", "BMP")])
def test_eight_bit_modes_decode_to_pillows_own_values(tmp_path, mode, fmt):
    from bench.data import FolderImages
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    rgb = Image.merge("RGB", [grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey.rotate(90)])
    source = (grey if mode in ("1", "L", "LA", "P") else rgb).convert(mode)
    source.save(tmp_path / f"a.{fmt.lower()}", format=fmt)
    with Image.open(tmp_path / f"a.{fmt.lower()}") as stored:
        for channels, target in ((1, "L"), (3, "RGB")):
            expected = np.asarray(stored.convert(target)).reshape(16, 16, channels)
            assert np.array_equal(FolderImages(tmp_path, 16, channels)[0], expected), (mode, channels)
    if mode in ("L", "RGB"):  # nothing lost on the way: 0..255 as written
        assert np.array_equal(FolderImages(tmp_path, 16, 1 if mode == "L" else 3)[0][..., 0], np.asarray(grey))


@pytest.mark.parametrize("array,fmt", [(np.full((16, 16), 300, np.uint16), "PNG"), (np.full((16, 16), 7, np.uint16), "TIFF"),
                                       (np.full((16, 16), 70000, np.int32), "TIFF"),
                                       (np.full((16, 16), 0.25, np.float32), "TIFF")])
def test_wider_than_eight_bit_images_are_refused_never_saturated(tmp_path, array, fmt):
    from bench.data import FolderImages
    from bench.errors import BenchError
    Image.fromarray(array).save(tmp_path / f"a.{fmt.lower()}", format=fmt)
    with pytest.raises(BenchError, match=r"a\.(png|tiff).*not 8-bit"):
        FolderImages(tmp_path, 16, 1)[0]
