"""Taming Transformers releases: safe loading, the networks and samplers against Taming's own outputs.

tests/fixtures/taming_tiny/ was made by tests/fixtures/make_taming_fixture.py with Taming's code
(github.com/CompVis/taming-transformers) and transformers 4.3.1; see there for what each array is.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from baselines.taming import (TamingRecomputeSampler, TamingSampler, taming_draw, taming_filter, taming_top_k)
from bench.errors import BenchError
from bench.loading.pickles import Placeholder, UnsafePickle, load_tensors, open_torch_file
from bench.loading.taming import (convert_taming, is_taming_release, load_converted_taming, load_taming,
                                  read_taming_release)
from bench.samplers import SampleNoise, SamplerSettings

FIXTURE = Path(__file__).parent / "fixtures" / "taming_tiny"
RELEASE = FIXTURE / "release"
YAML = "2021-01-01T00-00-00-project.yaml"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURE / "expected.npz"))


@pytest.fixture(scope="module")
def release():
    return load_taming(RELEASE)


@pytest.fixture
def copy(tmp_path):
    """A writable copy of the fixture release."""
    return Path(shutil.copytree(RELEASE, tmp_path / "release"))


def edit_yaml(release: Path, change) -> Path:
    path = release / "configs" / YAML
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


def settings(name="taming", temperature=1.0, top_k=None, top_p=None):
    return SamplerSettings(name, temperature=temperature, top_k=top_k, top_p=top_p)


# ----------------------------------------------------------------------------- against Taming's outputs

def test_release_is_detected_and_read(release):
    tokenizer, gpt, meta = release
    assert is_taming_release(RELEASE) and not is_taming_release(FIXTURE)
    assert (tokenizer.codebook_size, tokenizer.latent_hw, tokenizer.img_size, tokenizer.channels) == (32, 8, 16, 3)
    assert gpt.cfg.vocab_size == 32 and gpt.cfg.block_size == 64 and gpt.cfg.sos_token == 0
    assert meta["source"]["global_step"] == 1234 and meta["source"]["epoch"] == 7
    assert meta["source"]["config"] == f"configs/{YAML}" and len(meta["source"]["sha256"]) == 64


def test_encoder_codes_and_reconstruction_match_taming(release, expected):
    tokenizer = release[0]
    codes = tokenizer.encode(expected["images"])
    assert torch.equal(codes, torch.from_numpy(expected["codes"]))
    recon = tokenizer.decode_float(codes).numpy()
    assert np.abs(recon - expected["recon_float"]).max() < 1e-4
    assert np.array_equal(tokenizer.decode(codes), expected["recon_uint8"])


@pytest.mark.parametrize("cls, key", [(TamingSampler, "greedy_cached"), (TamingRecomputeSampler, "greedy_uncached")])
def test_greedy_tokens_identical_to_taming(release, expected, cls, key):
    tokenizer, gpt, _ = release
    tokens = cls(gpt, tokenizer).sample(SampleNoise(0, range(3)), settings(cls.name, temperature=0))
    assert np.array_equal(tokens.numpy(), expected[key])


def test_logits_match_taming(release, expected):
    gpt = release[1]
    greedy = torch.from_numpy(expected["greedy_cached"])
    sos = torch.zeros((len(greedy), 1), dtype=torch.long)
    with torch.no_grad():
        full = gpt(torch.cat((sos, greedy[:, :-1]), 1))
        cache, prev, cached = gpt.new_cache(len(greedy)), sos, []
        for i in range(greedy.shape[1]):
            cached.append(gpt(prev, cache)[:, -1])
            prev = greedy[:, i:i + 1]
    assert np.abs(full.numpy() - expected["logits_full"]).max() < 1e-4
    assert np.abs(torch.stack(cached, 1).numpy() - expected["logits_cached"]).max() < 1e-4


def test_decoded_images_match_taming(release, expected):
    tokenizer = release[0]
    images = tokenizer.decode_float(torch.from_numpy(expected["greedy_cached"])).numpy()
    assert np.abs(images - expected["decoded_float"]).max() < 1e-4
    # sample_fast.py's PNGs: 255 * (x + 1) / 2, clipped, truncated (the fixture's images reach the clip)
    assert np.array_equal(tokenizer.decode(expected["greedy_cached"]), expected["decoded_uint8"])
    assert (np.abs(expected["decoded_float"]) > 1).any()


def test_filtering_matches_taming(expected):
    logits = torch.from_numpy(expected["filter_logits"])
    for i, (k, p) in enumerate(zip(expected["filter_k"], expected["filter_p"])):
        out = taming_filter(logits.clone(), int(k), float(p))
        assert np.array_equal(torch.isfinite(out).numpy(), expected["filter_keep"][i]), (k, p)
        kept = torch.isfinite(out)
        assert torch.equal(out[kept], logits[kept])
        assert np.array_equal(torch.isfinite(taming_top_k(logits, int(k))).numpy(), expected["topk_keep"][i])
    # top-p 1.0 is not a no-op in float32: the cumulative sum passes 1.0 in the tail of peaked rows
    default = list(zip(expected["filter_k"], expected["filter_p"])).index((250, 1.0))
    assert expected["filter_keep"][default].sum(-1).min() < 250


def test_filter_without_top_k_is_none_and_top_p_alone_is_refused(release):
    logits = torch.randn(4, 32)
    assert torch.equal(taming_filter(logits, None, None), logits)
    sampler = TamingSampler(release[1], release[0])
    with pytest.raises(BenchError, match="top_p without top_k"):
        sampler.check(settings(top_p=0.9))


def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    u = torch.rand(64)
    assert torch.equal(taming_draw(logits, u, 0, 5, 0.5), logits.argmax(-1))


def test_draw_inverts_the_cdf_of_the_filtered_softmax():
    gen = torch.Generator().manual_seed(2)
    logits, u = torch.randn(200, 50, generator=gen) * 3, torch.rand(200, generator=gen)
    drawn = taming_draw(logits, u, 0.7, 10, 0.8)
    probs = taming_filter(logits / 0.7, 10, 0.8).softmax(-1).double()
    cdf = probs.cumsum(-1)
    expected = (cdf <= (u.double() * cdf[:, -1])[:, None]).sum(-1)
    assert torch.equal(drawn, expected)
    assert torch.isfinite(taming_filter(logits / 0.7, 10, 0.8).gather(1, drawn[:, None])).all()


@pytest.mark.parametrize("top_k, top_p, temperature", [(None, None, 1.0), (8, 0.9, 1.0), (250, None, 0.8)])
def test_cache_changes_nothing(release, top_k, top_p, temperature):
    tokenizer, gpt, _ = release
    s = settings(temperature=temperature, top_k=top_k, top_p=top_p)
    cached = TamingSampler(gpt, tokenizer).sample(SampleNoise(7, range(4)), s)
    recomputed = TamingRecomputeSampler(gpt, tokenizer).sample(SampleNoise(7, range(4)), s)
    assert torch.equal(cached, recomputed)
    assert len(set(map(tuple, cached.tolist()))) == 4  # distinct samples: the draws are not greedy
    # sample i depends on (seed, i) only
    alone = TamingSampler(gpt, tokenizer).sample(SampleNoise(7, [2]), s)
    assert torch.equal(alone[0], cached[2])


def test_sampler_interface(release):
    tokenizer, gpt, _ = release
    cached, recompute = TamingSampler(gpt, tokenizer), TamingRecomputeSampler(gpt, tokenizer)
    assert (cached.name, recompute.name, cached.prior_kind, cached.takes_steps) == \
        ("taming", "taming-recompute", "taming", False)
    assert cached.tokenizer is tokenizer and cached.seq_len == 64 and cached.codebook_size == 32
    assert cached.nfe(settings()) == recompute.nfe(settings()) == 64
    assert 0 < cached.flops_per_image(settings()) < recompute.flops_per_image(settings())


def test_bf16_switch_samples(release):
    from bench.execution import Execution
    tokenizer, gpt, _ = release
    sampler = TamingSampler(gpt, tokenizer, Execution.parse("bf16"))
    tokens = sampler.sample(SampleNoise(0, range(2)), settings(top_k=8, top_p=1.0))
    assert tokens.shape == (2, 64) and 0 <= int(tokens.min()) and int(tokens.max()) < 32
    assert "bf16" in sampler.execution()


# ----------------------------------------------------------------------------- safe loading

def test_lightning_checkpoint_is_refused_by_weights_only_and_read_here():
    ckpt = RELEASE / "checkpoints" / "last.ckpt"
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):
        torch.load(ckpt, weights_only=True)
    with open_torch_file(ckpt) as f:
        (key,) = f.root["callbacks"]
        assert isinstance(key, type) and issubclass(key, Placeholder)
        assert key.pickle_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
        assert isinstance(f.root["optimizer_states"][0]["state"], dict)
    assert "pytorch_lightning" not in sys.modules


class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", ["system", "exec", "eval_global"])
def test_malicious_pickle_runs_nothing(tmp_path, func):
    marker = tmp_path / "marker"
    payload = {"system": (os.system, f"touch {marker}"),
               "exec": (exec, f"open({str(marker)!r}, 'w').close()"),
               "eval_global": (eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")}[func]
    release = Path(shutil.copytree(RELEASE, tmp_path / "release"))
    ckpt = release / "checkpoints" / "last.ckpt"
    good = load_tensors(ckpt)
    torch.save({**good, "callbacks": {"x": _RunsCode(*payload)}}, ckpt)
    with pytest.raises(UnsafePickle, match=f"{ckpt}.*calls .*(system|exec|eval).*ran nothing"):
        load_taming(release)
    with pytest.raises(UnsafePickle):
        load_tensors(ckpt)
    assert not marker.exists()


def test_pickle_never_imports_what_it_names(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "bench_probe_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import bench_probe_module
    data = io.BytesIO()
    torch.save({"key": bench_probe_module.Thing, "t": torch.ones(2)}, data)
    marker.unlink()
    del sys.modules["bench_probe_module"]
    (tmp_path / "probe.pt").write_bytes(data.getvalue())
    out = load_tensors(tmp_path / "probe.pt")
    assert out["key"].pickle_name == "bench_probe_module.Thing" and torch.equal(out["t"], torch.ones(2))
    assert not marker.exists() and "bench_probe_module" not in sys.modules


def test_framework_objects_become_inert_placeholders(tmp_path, monkeypatch):
    import types
    fake = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass
    AttributeDict.__module__, AttributeDict.__qualname__ = fake.__name__, "AttributeDict"
    fake.AttributeDict = AttributeDict
    for name in ("pytorch_lightning", "pytorch_lightning.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    data = io.BytesIO()
    torch.save({"hyper_parameters": AttributeDict(lr=0.1), "w": torch.arange(3)}, data)
    monkeypatch.undo()
    (tmp_path / "h.pt").write_bytes(data.getvalue())
    out = load_tensors(tmp_path / "h.pt")
    hp = out["hyper_parameters"]
    assert isinstance(hp, Placeholder) and hp.pickle_name.endswith("AttributeDict") and ("lr", 0.1) in hp.items
    assert torch.equal(out["w"], torch.arange(3))


def test_nested_class_reference_is_a_placeholder_and_getattr_is_otherwise_refused(tmp_path, monkeypatch):
    import types
    fake = types.ModuleType("pytorch_lightning")

    class Outer:
        class Inner:
            pass
    Outer.__module__ = Outer.Inner.__module__ = "pytorch_lightning"
    Outer.__qualname__, Outer.Inner.__qualname__ = "Outer", "Outer.Inner"
    fake.Outer = Outer
    monkeypatch.setitem(sys.modules, "pytorch_lightning", fake)
    torch.save({"k": Outer.Inner}, tmp_path / "n.pt")  # protocol 2: getattr(Outer, "Inner")
    monkeypatch.undo()
    assert load_tensors(tmp_path / "n.pt")["k"].pickle_name == "pytorch_lightning.Outer.Inner"

    class Getattr:
        def __reduce__(self):
            return getattr, (OrderedDict, "fromkeys")
    torch.save({"k": Getattr()}, tmp_path / "g.pt")
    with pytest.raises(UnsafePickle, match="getattr"):
        load_tensors(tmp_path / "g.pt")


def test_out_of_bounds_tensor_is_refused(tmp_path):
    class Bad:
        def __reduce__(self):
            storage = torch.storage.TypedStorage(4, dtype=torch.float32, _internal=True)
            return torch._utils._rebuild_tensor_v2, (storage, 0, (1000,), (1,), False, OrderedDict())
    torch.save({"t": Bad()}, tmp_path / "bad.pt")
    with pytest.raises(UnsafePickle, match="out of bounds"):
        load_tensors(tmp_path / "bad.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_formats_read_back(tmp_path, zip_format):
    base = torch.randn(4, 5)
    obj = {"sd": OrderedDict(a=base, t=base.t(), row=base[1], h=torch.randn(3).half(), i=torch.arange(4),
                             b=torch.tensor([True, False]), p=torch.nn.Parameter(torch.ones(2))),
           "n": 3, "s": {1, 2}, "bytes": b"\x00\xff", "tuple": (1.5, None, "x")}
    torch.save(obj, tmp_path / "f.pt", _use_new_zipfile_serialization=zip_format)
    out = load_tensors(tmp_path / "f.pt")
    for k, v in obj["sd"].items():
        assert torch.equal(out["sd"][k], v.detach()) and out["sd"][k].dtype == v.dtype
    assert (out["n"], out["s"], out["bytes"], out["tuple"]) == (3, {1, 2}, b"\x00\xff", (1.5, None, "x"))


# ----------------------------------------------------------------------------- clear errors

def test_truncated_checkpoint(copy):
    ckpt = copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(BenchError, match=f"{ckpt}.*(truncated|unreadable)"):
        load_taming(copy)


def test_missing_checkpoint_and_yaml(copy, tmp_path):
    (copy / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(BenchError, match="checkpoints/last.ckpt not found"):
        load_taming(copy)
    other = Path(shutil.copytree(RELEASE, tmp_path / "other"))
    (other / "configs" / YAML).unlink()
    with pytest.raises(BenchError, match=f"{other}: no configs/<timestamp>-project.yaml"):
        load_taming(other)
    shutil.copy(RELEASE / "configs" / YAML, other / "configs" / YAML)
    shutil.copy(RELEASE / "configs" / YAML, other / "configs" / "2022-01-01T00-00-00-project.yaml")
    with pytest.raises(BenchError, match="several project yamls"):
        load_taming(other)
    with pytest.raises(BenchError, match="not a folder"):
        load_taming(tmp_path / "nowhere")


def test_conditional_config_refused(copy):
    path = edit_yaml(copy, lambda c: c["model"]["params"].update(
        cond_stage_config={"target": "taming.models.dummy_cond_stage.DummyCondStage", "params": {}}))
    with pytest.raises(BenchError, match=f"{path}: model.params.cond_stage_config .*DummyCondStage.*conditional"):
        load_taming(copy)
    edit_yaml(copy, lambda c: c["model"]["params"].update(cond_stage_config="__is_first_stage__"))
    with pytest.raises(BenchError, match="conditional"):
        load_taming(copy)


@pytest.mark.parametrize("change, match", [
    (lambda c: c["model"].update(target="taming.models.cond_transformer.Other"), r"model.target .*Net2NetTransformer only"),
    (lambda c: c["model"]["params"]["first_stage_config"]["params"].pop("embed_dim"),
     r"model.params.first_stage_config.params.embed_dim is missing"),
    (lambda c: c["model"]["params"]["transformer_config"]["params"].update(vocab_size=64), r"vocab_size = 64"),
    (lambda c: c["model"]["params"]["transformer_config"]["params"].update(n_layer="2"), r"n_layer = '2'; expected an integer"),
    (lambda c: c["model"]["params"]["first_stage_config"]["params"]["ddconfig"].update(double_z=True), r"double_z"),
    (lambda c: c["model"]["params"]["first_stage_config"]["params"].update(remap="used.npy"), r"remap"),
    (lambda c: c["model"]["params"].update(permuter_config={"target": "taming.modules.transformer.permuter.Subsample"}),
     r"permuter_config"),
    (lambda c: c["model"]["params"]["transformer_config"]["params"].update(block_size=32), r"block_size = 32"),
    (lambda c: c["model"]["params"]["transformer_config"]["params"].update(n_embd="${oops}"), r"interpolation"),
    (lambda c: c["model"]["params"].update(bogus=1), r"model.params has \['bogus'\]"),
])
def test_bad_config_names_file_and_key(copy, change, match):
    path = edit_yaml(copy, change)
    with pytest.raises(BenchError, match=match) as e:
        load_taming(copy)
    assert str(path) in str(e.value)


def test_shape_mismatch_names_file_and_key(copy):
    edit_yaml(copy, lambda c: c["model"]["params"]["transformer_config"]["params"].update(n_embd=64))
    ckpt = copy / "checkpoints" / "last.ckpt"
    with pytest.raises(BenchError, match=f"{ckpt} does not fit .*{YAML}.*shape mismatch.*transformer\\."):
        load_taming(copy)


def test_wrong_tensor_in_checkpoint(copy):
    ckpt = copy / "checkpoints" / "last.ckpt"
    top = {k: v for k, v in load_tensors(ckpt).items() if k != "callbacks"}  # placeholders do not pickle
    top["state_dict"]["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(top, ckpt)
    with pytest.raises(BenchError, match=r"first_stage_model.quant_conv.weight: file \(3, 3, 1, 1\) vs model"):
        read_taming_release(copy)
    del top["state_dict"]["first_stage_model.quant_conv.weight"]
    top["state_dict"]["cond_stage_model.embedding.weight"] = torch.zeros(2)
    torch.save(top, ckpt)
    with pytest.raises(BenchError, match="cond_stage_model.embedding.weight"):
        read_taming_release(copy)


def test_tokenizer_refuses_other_images(release):
    tokenizer = release[0]
    with pytest.raises(BenchError, match="16x16x3"):
        tokenizer.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(BenchError, match="16px x 3 channels, dataset ffhq is 256px"):
        tokenizer.check_images(256, 3, "ffhq")
    with pytest.raises(BenchError, match="tokens outside"):
        tokenizer.decode(np.full((1, 64), 32))


def test_convert_round_trip(release, expected, tmp_path):
    written = convert_taming(RELEASE, tmp_path / "converted")
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) == [
        "taming_first_stage.json", "taming_first_stage.safetensors", "taming_transformer.json",
        "taming_transformer.safetensors"]
    tokenizer, gpt, meta = load_converted_taming(tmp_path / "converted")
    assert set(written) == {"first_stage", "transformer"} and meta["source"]["global_step"] == 1234
    tokens = TamingSampler(gpt, tokenizer).sample(SampleNoise(0, range(1)), settings(temperature=0))
    assert np.array_equal(tokens.numpy()[0], expected["greedy_cached"][0])
    assert np.array_equal(tokenizer.decode(tokens), expected["decoded_uint8"][:1])
