"""bench train: resumable prior training with held-out early stopping, and where it may write."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench import train as training
from bench.checkpoints import WEIGHTS_DIR, file_sha256
from bench.models import TransformerConfig
from conftest import bench

TINY = dict(codebook_size=8, block_size=16, n_layers=1, n_head=2, n_emb=16,
            embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)


def tiny_tokens(seed, n):
    g = np.random.default_rng(seed)
    return g.integers(0, 8, (n, 4, 4))  # (N, h, w) codes, as the tokenizer gives


def tiny_run(out, causal, resume=False):
    tc = training.PriorTrainConfig(steps=12, batch_size=8, warmup=3, eval_every=3, eval_draws=2,
                                   min_steps=100)
    return training.train_prior(tiny_tokens(0, 40), tiny_tokens(1, 10), TransformerConfig(causal=causal, **TINY),
                                tc, str(out), {"data": "tiny"}, progress=False, resume=resume)


@pytest.mark.parametrize("causal", [False, True])
def test_resumed_training_equals_an_uninterrupted_one(tmp_path, monkeypatch, causal):
    straight = tiny_run(tmp_path / "straight", causal)

    save = training.save_resume

    def save_then_die(path, state):  # the process is killed just after the state of step 6 is written
        save(path, state)
        if state["step"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "cut", causal)
    assert not (tmp_path / "cut.json").exists() and (tmp_path / "cut.resume.pt").is_file()
    monkeypatch.setattr(training, "save_resume", save)
    resumed = tiny_run(tmp_path / "cut", causal, resume=True)

    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "cut.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in ("selected_step", "steps_run", "best_heldout_bits", "heldout_bits_per_token", "samples_seen", "stopped"):
        assert straight[key] == resumed[key], key
    meta = [json.loads((tmp_path / f"{s}.json").read_text()) for s in ("straight", "cut")]
    assert meta[0]["log"] == meta[1]["log"]
    assert [(s["from_step"], s["to_step"]) for s in meta[1]["sittings"]] == [(0, 6), (6, 12)]
    # the checkpoint is the best EMA weights by held-out loss, and the record says where it came from
    log = meta[0]["log"]
    best = min(log, key=lambda e: e["heldout_bits"])
    assert straight["selected_step"] == best["step"] and straight["steps_run"] == 12
    assert straight["heldout_bits_per_token"] == pytest.approx(straight["best_heldout_bits"], rel=1e-6)
    assert straight["samples_seen"] == 12 * 8 and straight["stopped"].startswith("cap:")
    assert straight["train_flops"] == training.training_flops(TransformerConfig(causal=causal, **TINY), 96) > 0

    # killed after its last step but before the checkpoint was written: --resume writes it
    (tmp_path / "cut.json").unlink()
    (tmp_path / "cut.safetensors").unlink()
    again = tiny_run(tmp_path / "cut", causal, resume=True)
    assert again["selected_step"] == straight["selected_step"] and again["steps_run"] == 12
    assert torch.equal(load_file(tmp_path / "cut.safetensors")["head.weight"], a["head.weight"])
    # a finished training is not continued, and a fresh one does not overwrite its resume state
    with pytest.raises(training.BenchError, match="already finished"):
        tiny_run(tmp_path / "cut", causal, resume=True)
    with pytest.raises(training.BenchError, match="--resume"):
        tiny_run(tmp_path / "cut", causal)
    with pytest.raises(training.BenchError, match="no resume state"):
        tiny_run(tmp_path / "none", causal, resume=True)


def test_plateau_rule():
    log = [{"step": s, "heldout_bits": b} for s, b in [(250, 3.0), (500, 2.5), (750, 2.2), (1000, 2.19)]]
    assert training.plateaued(log[:1], 250, 0.01) == (False, None)  # nothing in the first three quarters
    stop, gain = training.plateaued(log, 1000, 0.01)  # best at 750 (<= 3/4 of 1000): 2.2, now 2.19
    assert stop and gain == pytest.approx(0.01 / 2.2)
    stop, gain = training.plateaued(log[:3], 750, 0.01)  # best at 500 (<= 562): 2.5, now 2.2
    assert not stop and gain == pytest.approx(0.3 / 2.5)
    rising = log + [{"step": 1250, "heldout_bits": 2.3}, {"step": 1500, "heldout_bits": 2.4}]  # overfitting
    assert training.plateaued(rising, 1500, 0.01) == (True, 0.0)  # the best (2.19 at 1000) stays put


def test_absorbing_heldout_is_fixed_and_stratified():
    cfg = TransformerConfig(causal=False, **TINY)
    tc = training.PriorTrainConfig(eval_draws=4)
    x = torch.as_tensor(tiny_tokens(2, 30)).reshape(30, -1)
    a, b = training.HeldOut(x, cfg, tc), training.HeldOut(x, cfg, tc)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.t, b.t)
    # draw k of every sequence has t in the k-th quarter of 1..16
    assert [(a.t[k * 30:(k + 1) * 30].min().item(), a.t[k * 30:(k + 1) * 30].max().item()) for k in range(4)] == \
        [(1, 4), (5, 8), (9, 12), (13, 16)]
    model = training.Transformer(cfg)
    assert a.bits(model) == b.bits(model)


def test_train_never_overwrites_a_shipped_checkpoint_unasked(workdir):
    before = file_sha256(WEIGHTS_DIR / "digits" / "extractor.safetensors")
    for out in ([], ["--out", "builtin:digits/extractor"], ["--out", str(WEIGHTS_DIR / "digits" / "extractor")]):
        code, text = bench("train", "--model", "extractor", "--steps", 1, *out)
        assert code == 2 and text.startswith("error:") and "--replace-shipped" in text, text
    assert file_sha256(WEIGHTS_DIR / "digits" / "extractor.safetensors") == before
    code, text = bench("train", "--model", "vq", "--out", workdir / "vq", "--resume")
    assert code == 2 and "error: --resume applies to the priors" in text


def test_train_honours_steps_for_the_extractor(workdir):
    code, text = bench("train", "--model", "extractor", "--steps", 3, "--out", workdir / "ext")
    assert code == 0, text
    meta = json.loads((workdir / "ext.json").read_text())
    assert meta["train"]["steps"] == 3 and meta["train"]["epochs"] == 1
    assert text.count("epoch ") == 1
