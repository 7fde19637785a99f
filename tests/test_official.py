"""Official Unleashing Transformers checkpoints in bench: numerics against the official code, bad
files, hyperparameters, the paper's datasets, the published numbers, and an end-to-end run.

tests/fixtures/official_tiny/ was written by tests/fixtures/make_official_fixture.py, which builds
tiny models with the official code and saves them as its training scripts do, together with the
official outputs on fixed inputs (reference.npz). The official code itself is never imported here.
"""
import io
import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from bench import paper
from bench.loading import official
from bench.checkpoints import file_sha256, load_checkpoint
from bench.config import load_config
from bench.errors import BenchError
from bench.loading import load_transformer, load_vq
from bench.results import SCHEMA, RunStore
from bench.samplers import SamplerSettings
from conftest import bench

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny"
VQGAN, ABSORBING, AUTOREGRESSIVE = (FIXTURE / f"{k}_ema_1.th" for k in ("vqgan", "absorbing", "autoregressive"))
HPARAMS = json.loads((FIXTURE / "hparams.json").read_text())
PROJECT_RESULTS = Path(__file__).resolve().parent.parent / "results"
TOL = 1e-4  # fp32; the differences seen are about 2e-6


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE / "reference.npz") as f:
        return {k: f[k] for k in f.files}


def outputs(vq, absorbing, autoregressive, ref) -> dict:
    """Every output the fixture holds, computed by bench's modules."""
    with torch.no_grad():
        x = torch.from_numpy(ref["enc_images"])
        z = vq.encoder(x)
        z_q, _, codes = vq.quantize(z)
        ar_in = torch.from_numpy(ref["ar_tokens"])[:, :-1]
        cache = autoregressive.new_cache(len(ar_in))  # the cached execution, one token at a time
        cached = torch.cat([autoregressive(ar_in[:, :0], cache)]
                           + [autoregressive(ar_in[:, i:i + 1], cache) for i in range(ar_in.shape[1])], dim=1)
        return {"enc_latents": z, "enc_codes": codes, "recon": vq.generator(z_q),
                "dec_images": vq.decode(torch.from_numpy(ref["dec_codes"])),
                "den_logits": absorbing(torch.from_numpy(ref["den_tokens"])),
                "ar_logits": autoregressive(ar_in), "ar_logits_cached": cached}


def assert_matches_official(out: dict, ref: dict) -> dict:
    diffs = {}
    assert np.array_equal(out["enc_codes"].numpy(), ref["enc_codes"])
    assert len(np.unique(ref["enc_codes"])) > 10  # the fixture exercises many codes
    for key in ("enc_latents", "recon", "dec_images", "den_logits", "ar_logits", "ar_logits_cached"):
        theirs = ref[key.replace("_cached", "")]
        ours = out[key].numpy()
        assert ours.shape == theirs.shape, key
        diffs[key] = float(np.abs(ours - theirs).max())
        assert diffs[key] < TOL, (key, diffs[key])
    print("max abs diff vs official:", {k: f"{v:.2e}" for k, v in diffs.items()})
    return diffs


# ----------------------------------------------------------------------------- numerics

def test_official_files_load_and_match_the_official_outputs(ref):
    vq, meta = load_vq(VQGAN, official_hparams=HPARAMS)
    den, den_meta = load_transformer(ABSORBING, "absorbing", official_hparams=HPARAMS)
    ar, _ = load_transformer(AUTOREGRESSIVE, "autoregressive", official_hparams=HPARAMS)
    assert meta["kind"] == "vq" and meta["source"]["sha256"] == file_sha256(VQGAN)
    assert meta["hparams"]["codebook_size"] == 32 and den_meta["hparams"]["causal"] is False
    assert_matches_official(outputs(vq, den, ar, ref), ref)


def test_convert_command_writes_harness_checkpoints_with_the_same_numerics(tmp_path, ref):
    code, out = bench("convert", "--from", "official-ut", "--vqgan", VQGAN, "--absorbing", ABSORBING,
                      "--autoregressive", AUTOREGRESSIVE, "--hparams", FIXTURE / "hparams.json", "--out", tmp_path)
    assert code == 0, out
    vq, meta = load_vq(tmp_path / "vq")
    den, _ = load_transformer(tmp_path / "absorbing", "absorbing")
    ar, ar_meta = load_transformer(tmp_path / "autoregressive", "autoregressive")
    assert meta["source"] == {"format": "official-ut", "official_file": VQGAN.name, "sha256": file_sha256(VQGAN),
                              "trusted_pickle": False}
    assert meta["official_hparams"]["nf"] == 32 and ar_meta["hparams"]["causal"] is True
    # what was dropped: the discriminator, LPIPS, the ELBO head, training buffers and causal masks
    state, _ = load_checkpoint(tmp_path / "vq")
    assert not any(k.startswith(("disc", "perceptual")) or "logsigma" in k for k in state)
    assert not any(k.endswith("attn.mask") for k in load_checkpoint(tmp_path / "autoregressive")[0])
    assert "Lt_history" not in load_checkpoint(tmp_path / "absorbing")[0]
    assert_matches_official(outputs(vq, den, ar, ref), ref)


def test_convert_needs_exactly_one_source_of_hyperparameters(tmp_path):
    code, out = bench("convert", "--from", "official-ut", "--vqgan", VQGAN, "--out", tmp_path)
    assert code == 2 and "--preset" in out
    code, out = bench("convert", "--from", "official-ut", "--vqgan", VQGAN, "--preset", "cathedrals", "--out", tmp_path)
    assert code == 2 and "cathedrals" in out and "churches" in out
    # the preset is the released architecture, which the tiny fixture is not: the codebook is named
    code, out = bench("convert", "--from", "official-ut", "--vqgan", VQGAN, "--preset", "churches", "--out", tmp_path)
    assert code == 2 and "quantize.embedding.weight" in out and "(32, 16)" in out and "1024" in out
    assert not any(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- bad files

def test_truncated_and_empty_files_name_the_file(tmp_path):
    data = VQGAN.read_bytes()
    for name, content in (("half.th", data[:len(data) // 2]), ("empty.th", b""), ("junk.th", b"\x80\x02junk" * 9)):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(BenchError, match="unreadable or truncated") as e:
            load_vq(bad, official_hparams=HPARAMS)
        assert str(bad) in str(e.value)
    with pytest.raises(BenchError, match="not found"):
        load_vq(tmp_path / "absent.th", official_hparams=HPARAMS)


class NotATensor:
    """Stands for anything whose unpickling needs code."""


def test_a_pickle_needing_code_is_refused_unless_trusted(tmp_path, ref):
    state = torch.load(VQGAN, weights_only=True)
    bad = tmp_path / "vqgan_ema_2.th"
    torch.save({**state, "optimizer_hint": NotATensor()}, bad)
    with pytest.raises(BenchError, match="trust-checkpoint") as e:
        load_vq(bad, official_hparams=HPARAMS)
    assert str(bad) in str(e.value) and "NotATensor" in str(e.value)
    code, out = bench("convert", "--from", "official-ut", "--vqgan", bad, "--hparams", FIXTURE / "hparams.json",
                      "--out", tmp_path / "out")
    assert code == 2 and "--trust-checkpoint" in out and not (tmp_path / "out").exists()
    # trusted: the tensors are read, the rest left out
    vq, meta = load_vq(bad, official_hparams=HPARAMS, trust=True)
    assert meta["source"]["trusted_pickle"] is True
    with torch.no_grad():
        assert np.array_equal(vq.encode(torch.from_numpy(ref["enc_images"])).numpy(), ref["enc_codes"])
    code, out = bench("convert", "--from", "official-ut", "--vqgan", bad, "--hparams", FIXTURE / "hparams.json",
                      "--out", tmp_path / "out", "--trust-checkpoint")
    assert code == 0, out


def test_a_whole_pickled_object_is_not_a_state_dict(tmp_path):
    bad = tmp_path / "model.th"
    torch.save(NotATensor(), bad)
    with pytest.raises(BenchError, match="NotATensor"):
        load_vq(bad, official_hparams=HPARAMS)
    with pytest.raises(BenchError, match="not a state dict"):
        load_vq(bad, official_hparams=HPARAMS, trust=True)


def test_codebook_and_shape_mismatches_name_the_key_and_both_shapes():
    with pytest.raises(BenchError) as e:
        load_vq(VQGAN, official_hparams={**HPARAMS, "codebook_size": 64})
    msg = str(e.value)
    assert "quantize.embedding.weight" in msg and "(32, 16)" in msg and "(64, 16)" in msg and str(VQGAN) in msg
    with pytest.raises(BenchError) as e:
        load_transformer(ABSORBING, "absorbing", official_hparams={**HPARAMS, "codebook_size": 64})
    assert "head.weight" in str(e.value) and "(32, 32)" in str(e.value) and "(64, 32)" in str(e.value)
    with pytest.raises(BenchError) as e:
        load_transformer(ABSORBING, "absorbing", official_hparams={**HPARAMS, "bert_n_emb": 64})
    assert "pos_emb: file (1, 64, 32) vs model (1, 64, 64)" in str(e.value) and str(ABSORBING) in str(e.value)
    with pytest.raises(BenchError, match="missing keys.*blocks.2"):
        load_transformer(ABSORBING, "absorbing", official_hparams={**HPARAMS, "bert_n_layers": 3})


def test_a_file_of_another_kind_is_named():
    with pytest.raises(BenchError, match="not an official vq file.*official absorbing file"):
        load_vq(ABSORBING, official_hparams=HPARAMS)
    with pytest.raises(BenchError, match="not an official absorbing file.*official autoregressive file"):
        load_transformer(AUTOREGRESSIVE, "absorbing", official_hparams=HPARAMS)


# ----------------------------------------------------------------------------- hyperparameters

def test_presets_follow_the_official_defaults():
    vq = official.vq_config("churches")
    assert (vq.img_size, vq.nf, vq.ch_mult, vq.res_blocks, vq.codebook_size, vq.emb_dim, vq.latent_hw) == \
        (256, 128, [1, 1, 2, 2, 4], 2, 1024, 256, 16)
    t = official.transformer_config("ffhq", "absorbing")
    assert (t.n_layers, t.n_head, t.n_emb, t.block_size, t.codebook_size, t.causal) == (24, 8, 512, 256, 1024, False)
    assert official.transformer_config("bedrooms", "autoregressive").causal is True
    # a table that names a preset as its dataset starts from it, as the official --dataset does
    assert official.transformer_config({"dataset": "churches", "bert_n_layers": 12}, "absorbing").n_layers == 12


def test_unknown_or_missing_official_flags():
    with pytest.raises(BenchError, match="'bert_n_layer'"):
        official.resolve_hparams({**HPARAMS, "bert_n_layer": 2})
    with pytest.raises(BenchError, match="'nf' must be an integer"):
        official.resolve_hparams({**HPARAMS, "nf": "32"})
    with pytest.raises(BenchError, match="lack nf"):
        official.vq_config({k: v for k, v in HPARAMS.items() if k != "nf"})
    with pytest.raises(BenchError, match="latent_shape"):
        official.vq_config({**HPARAMS, "latent_shape": [1, 16, 16]})
    with pytest.raises(BenchError, match="gumbel"):
        official.vq_config({**HPARAMS, "quantizer": "gumbel"})
    # flags of the official training scripts are accepted (a logged hparams dump works as is)
    official.vq_config({**HPARAMS, "lr": 1e-4, "ema_beta": 0.995, "log_dir": "x", "sampler": "absorbing"})
    with pytest.raises(BenchError, match="official_hparams"):
        load_vq(VQGAN)  # an official file without hyperparameters


def _config_with(tmp_path, official_hparams: str) -> Path:
    p = tmp_path / "bench.toml"
    p.write_text(f"""
[datasets.x]
kind = "lsun"
train = "/nowhere"
resolution = 16
channels = 3
extractor = "digits"
tokenizer = "/nowhere/vqgan_ema_1.th"
official_hparams = {official_hparams}
metrics = {{ dc_k = 3 }}
""")
    return p


def test_config_validates_official_hparams_and_dataset_metrics(tmp_path):
    cfg = load_config(_config_with(tmp_path, '"churches"'))
    assert cfg.datasets["x"].official_hparams == "churches" and cfg.datasets["x"].metrics == {"dc_k": 3}
    cfg = load_config(_config_with(tmp_path, "{ dataset = \"churches\", bert_n_layers = 12 }"))
    assert cfg.datasets["x"].official_hparams == {"dataset": "churches", "bert_n_layers": 12}
    with pytest.raises(BenchError, match=r"datasets\.x\.official_hparams.*'cathedrals'"):
        load_config(_config_with(tmp_path, '"cathedrals"'))
    with pytest.raises(BenchError, match=r"datasets\.x\.official_hparams.*'bert_n_layer'"):
        load_config(_config_with(tmp_path, "{ bert_n_layer = 12 }"))
    with pytest.raises(BenchError, match=r"datasets\.x\.official_hparams must be a string or a table"):
        load_config(_config_with(tmp_path, "12"))


def test_the_papers_datasets_are_configured():
    cfg = load_config()
    for name, train in (("churches", "church_outdoor_train_lmdb"), ("bedrooms", "bedroom_train_lmdb"),
                        ("ffhq", "images1024x1024")):
        ds = cfg.datasets[name]
        assert ds.resolution == 256 and ds.channels == 3 and ds.extractor == "inception-v3-compat"
        assert ds.num_samples == 50000 and ds.official_hparams == name and ds.source.train.endswith(train)
        # only what can be downloaded: no autoregressive UT release; FFHQ's Taming transformer is released
        assert ds.tokenizer.endswith(".th") and set(ds.priors) == ({"absorbing", "taming"} if name == "ffhq"
                                                                   else {"absorbing"})
        assert cfg.metrics.overridden(ds.overrides.as_dict()).pr_k == 3 and ds.overrides.dc_k == 3
        slugs = [SamplerSettings(e.sampler, s, t, e.top_k, e.top_p).slug() for e in ds.sweep for t in e.temperature
                 for s in (e.steps or [None])]
        assert slugs == ["absorbing-s50-t1", "absorbing-s100-t1", "absorbing-s150-t1", "absorbing-s200-t1",
                         "absorbing-s256-t1", "absorbing-s256-t0.9"] + (["taming-t1-k250-p1"] if name == "ffhq" else [])
    assert cfg.datasets["churches"].tokenizer.endswith("vqgan_ema_2200000.th")


def test_datasets_command_names_what_to_set(workdir, monkeypatch):
    for var in ("LSUN_ROOT", "FFHQ_ROOT", "UT_LOGS"):
        monkeypatch.delenv(var, raising=False)
    code, out = bench("datasets")
    assert code == 0
    section = out.split("churches (")[1].split("bedrooms (")[0]
    assert "export LSUN_ROOT=" in section and "export UT_LOGS=" in section
    monkeypatch.setenv("LSUN_ROOT", str(workdir / "lsun"))
    monkeypatch.setenv("UT_LOGS", str(workdir / "logs"))
    code, out = bench("datasets")
    section = out.split("churches (")[1].split("bedrooms (")[0]
    assert f"{workdir / 'lsun' / 'church_outdoor_train_lmdb'} (missing); set $LSUN_ROOT or datasets.churches.train" in section
    tok = workdir / "logs" / "vqgan_churches" / "saved_models" / "vqgan_ema_2200000.th"
    assert f"{tok} (missing); set $UT_LOGS or datasets.churches.tokenizer" in section
    tok.parent.mkdir(parents=True)
    shutil.copy(VQGAN, tok)
    code, out = bench("datasets")
    assert f"tokenizer: official checkpoint {tok} (present)" in out


# ----------------------------------------------------------------------------- published numbers

def test_published_runs_are_generated_from_bench_paper(tmp_path):
    paper.write_all(tmp_path)
    for dataset in paper.PUBLISHED:
        for f in ("results.json", "results.csv", "README.md"):
            committed = PROJECT_RESULTS / dataset / "paper" / f
            assert committed.read_text() == (tmp_path / dataset / "paper" / f).read_text(), \
                f"{committed} is stale: run `python -m bench.paper`"
    data = json.loads((PROJECT_RESULTS / "churches" / "paper" / "results.json").read_text())
    assert data["manifest"]["kind"] == "published" and data["manifest"]["seed"] is None
    by = {r["slug"]: r for r in data["rows"]}
    assert [by[f"absorbing-s{s}-t1"]["fid"] for s in (50, 100, 150, 200, 256)] == [6.86, 6.09, 5.81, 5.68, 5.58]
    assert by["absorbing-s256-t0.9"]["fid"] == 4.07 and by["absorbing-s256-t0.9"]["coverage"] == 0.74
    assert by["taming"]["fid"] == 7.81 and "Taming" in by["taming"]["note"] and by["taming"].get("top_k") is None
    ffhq = {r["slug"]: r for r in json.loads((PROJECT_RESULTS / "ffhq" / "paper" / "results.json").read_text())["rows"]}
    assert ffhq["taming-t1-k250-p1"]["fid"] == 9.6  # the slug a `taming` run of the FFHQ release produces
    assert by["absorbing-s256-t1"].get("kid_mean") is None
    for row in data["rows"]:
        if row["slug"] == "taming":
            continue  # churches' Taming-style model: settings not given, pairs with no harness row
        s = SamplerSettings(row["sampler"], row.get("steps"), row.get("temperature"), row.get("top_k"), row.get("top_p"))
        assert row["slug"] == s.slug()
    bedrooms = {r["slug"]: r for r in json.loads((PROJECT_RESULTS / "bedrooms" / "paper" / "results.json")
                                                  .read_text())["rows"]}
    assert bedrooms["absorbing-s256-t1"]["fid"] == 5.07 and bedrooms["absorbing-s256-t1"]["fid_vs_steps_figure"] == 5.42
    assert bedrooms["absorbing-s256-t0.9"].get("precision") is None  # not in the paper's facts: null
    header = (PROJECT_RESULTS / "ffhq" / "paper" / "results.csv").read_text().splitlines()[0]
    assert header.split(",") == SCHEMA


def test_bench_never_writes_into_a_published_run(tmp_path):
    paper.write_paper_run(tmp_path, "churches")
    with pytest.raises(BenchError, match="published"):
        RunStore(tmp_path, "churches", "paper", force=True).check({})


# ----------------------------------------------------------------------------- end to end

def _write_lmdb(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            base = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)  # smooth images, 20x24 (resized + cropped)
            image = Image.fromarray(base).resize((24, 20), Image.BILINEAR)
            buf = io.BytesIO()
            image.save(buf, format="webp", quality=90)
            txn.put(f"{i:040x}".encode(), buf.getvalue())
    env.close()


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.mark.slow
def test_churches_preset_end_to_end_on_a_tiny_lmdb(workdir, monkeypatch):
    """The churches entry of bench.toml as written (LSUN kind, ${LSUN_ROOT} and ${UT_LOGS} paths, official
    .th files, paper-shaped sweep, dc_k = 3) with a profile that shrinks it to the tiny fixture."""
    monkeypatch.setenv("LSUN_ROOT", str(workdir / "lsun"))
    monkeypatch.setenv("UT_LOGS", str(workdir / "logs"))
    (workdir / "lsun").mkdir()
    _write_lmdb(workdir / "lsun" / "church_outdoor_train_lmdb", 8, 0)
    _write_lmdb(workdir / "lsun" / "church_outdoor_val_lmdb", 5, 1)
    sweep = [{"sampler": "absorbing", "steps": [2, 4], "temperature": [1.0]},
             {"sampler": "absorbing", "steps": [4], "temperature": [0.9]},
             {"sampler": "autoregressive", "temperature": [1.0]}]
    with open(workdir / "bench.toml", "a") as f:
        f.write("\n[profiles.tiny]\ntiming = { batch_size = 2, warmup = 0, repeats = 1 }\n"
                "[profiles.tiny.datasets.churches]\nresolution = 16\nextractor = \"digits\"\nnum_samples = 5\n"
                "priors = { absorbing = \"${UT_LOGS}/absorbing_churches/saved_models/absorbing_ema_2000000.th\", "
                "autoregressive = \"${UT_LOGS}/autoregressive_churches/saved_models/autoregressive_ema_1.th\" }\n"
                f"official_hparams = {_toml(HPARAMS)}\nsweep = [{', '.join(_toml(s) for s in sweep)}]\n")
    cfg = load_config(workdir / "bench.toml", "tiny")
    ds = cfg.datasets["churches"]
    files = {"tokenizer": VQGAN, "priors.absorbing": ABSORBING, "priors.autoregressive": AUTOREGRESSIVE}
    for key, src in files.items():
        written = ds.tokenizer if key == "tokenizer" else ds.priors[key.split(".")[1]]
        dst = Path(cfg.checkpoint_ref(ds, written, key))
        assert dst.name.endswith(".th") and str(workdir / "logs") in str(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)

    code, out = bench("run", "--dataset", "churches", "--profile", "tiny", "--run-name", "e2e", "--quiet")
    assert code == 0, out
    run = workdir / "results" / "churches" / "e2e"
    data = json.loads((run / "results.json").read_text())
    assert [r["slug"] for r in data["rows"]] == ["data", "reconstruction", "random-codes", "absorbing-s2-t1",
                                                 "absorbing-s4-t1", "absorbing-s4-t0.9", "autoregressive-t1"]
    by = {r["slug"]: r for r in data["rows"]}
    assert by["data"]["n_samples"] == 5 and by["absorbing-s4-t0.9"]["n_samples"] == 5
    assert by["autoregressive-t1"]["nfe"] == 64 and by["absorbing-s4-t1"]["nfe"] == 4
    for row in data["rows"]:
        assert np.isfinite(row["fid"]) and row["fid"] >= 0
    m = data["manifest"]
    assert m["metrics"]["dc_k"] == 3 and m["metrics"]["pr_k"] == 3
    assert m["hashes"]["tokenizer"] == file_sha256(VQGAN) and m["hashes"]["absorbing"] == file_sha256(ABSORBING)
    assert m["hashes"]["autoregressive"] == file_sha256(AUTOREGRESSIVE)
    assert m["dataset_config"]["official_hparams"]["nf"] == 32 and m["dataset_config"]["kind"] == "lsun"

    # the published numbers are a stored run to compare against, and never a place to write
    shutil.copytree(PROJECT_RESULTS / "churches" / "paper", workdir / "results" / "churches" / "paper")
    code, out = bench("compare", "paper", "e2e", "--dataset", "churches")
    assert code == 2 and "num_samples: 50000 vs 5" in out  # a tiny run is not the paper's protocol
    code, out = bench("compare", "paper", "e2e", "--dataset", "churches", "--allow-mismatch")
    assert code == 0, out
    assert "| absorbing, 4 steps, t=0.9 |" not in out and "(no rows in common)" in out  # slugs differ by steps
    code, out = bench("run", "--dataset", "churches", "--profile", "tiny", "--run-name", "paper", "--force", "--quiet")
    assert code == 2 and "published" in out
    assert json.loads((workdir / "results" / "churches" / "paper" / "results.json").read_text())["manifest"]["kind"] \
        == "published"
