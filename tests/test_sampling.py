"""The absorbing sampler and its loss: per-sample seeding, unmasking schedule, draws, loss types."""
import math

import numpy as np
import pytest
import torch

from bench.samplers.absorbing import AbsorbingSampler, loss_from_logits, mask_tokens
from bench.errors import BenchError
from bench.models import Transformer, TransformerConfig
from bench.samplers import SampleNoise, SamplerSettings, draw_tokens, filter_logits, generate

torch.set_num_threads(1)  # small batches: thread start-up dominates, and results must not depend on it


def tiny_denoiser(seq_len=16, codebook=12, seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(codebook_size=codebook, block_size=seq_len, n_layers=2, n_head=2,
                                         n_emb=32)).eval()


def test_same_tokens_for_batch_sizes_1_7_64():
    sampler = AbsorbingSampler(tiny_denoiser())
    s = SamplerSettings("absorbing", steps=8, temperature=1.0)
    ref = generate(sampler, s, seed=3, indices=range(64), batch_size=64, progress=False)
    for b in (1, 7):
        assert np.array_equal(generate(sampler, s, seed=3, indices=range(64), batch_size=b, progress=False), ref)
    # a resumed or sharded run draws sample i from the same stream
    assert np.array_equal(generate(sampler, s, 3, range(40, 64), 7, progress=False), ref[40:])
    assert not np.array_equal(generate(sampler, s, 4, range(64), 64, progress=False), ref)


def unmask_trace(steps, n=256, seq_len=64, seed=0):
    sampler = AbsorbingSampler(tiny_denoiser(seq_len=seq_len))
    trace = []
    x = sampler.sample(SampleNoise(seed, range(n)), SamplerSettings("absorbing", steps, 1.0), trace=trace)
    return x, torch.stack(trace)  # (steps, n, L)


def test_every_position_unmasked_exactly_once_and_never_rewritten():
    x, trace = unmask_trace(steps=10, n=32)
    assert (x < 12).all(), "mask id left in the output"
    assert (trace.sum(0) == 1).all(), "each position must be written exactly once"


def test_written_tokens_are_never_rewritten():
    sampler = AbsorbingSampler(tiny_denoiser())
    noise_a, noise_b = SampleNoise(0, range(8)), SampleNoise(0, range(8))
    trace = []
    final = sampler.sample(noise_a, SamplerSettings("absorbing", 6, 1.0), trace=trace)
    # replay step by step: once written, a position keeps the final value
    written = torch.zeros_like(final, dtype=torch.bool)
    for changes in trace:
        assert not (changes & written).any()
        written |= changes
    assert written.all()
    assert torch.equal(final, sampler.sample(noise_b, SamplerSettings("absorbing", 6, 1.0)))


@pytest.mark.slow
def test_64_steps_unmask_one_token_per_step_on_average():
    # Each position's unmasking step is uniform on 1..S, so with L = S = 64 the count per step is
    # Binomial(64, 1/64): mean 1, sd ~0.99. Over 256 samples the per-step mean has sd ~0.062.
    # The seeds are fixed, so this cannot flake; 6 sd (0.37) bounds every step.
    _, trace = unmask_trace(steps=64, n=256)
    per_step = trace.sum(2).float().mean(1)  # (64,)
    assert per_step.shape == (64,)
    assert (per_step - 1).abs().max() < 0.37
    assert abs(per_step.mean().item() - 1) < 1e-6  # every position is unmasked once in 64 steps
    # the step at which a position is unmasked is uniform: chi-square over 64 bins, 99.99% bound
    counts = trace.sum((1, 2)).float()
    expected = counts.sum() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 120  # chi2(63) has mean 63 and 99.99% quantile ~ 113


def test_one_step_unmasks_everything_at_once():
    _, trace = unmask_trace(steps=1, n=4, seq_len=16)
    assert trace.shape[0] == 1 and trace.all()


def test_temperature_zero_is_argmax_and_steps_are_checked():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]]])
    assert draw_tokens(logits, torch.rand(1, 2), 0.0).tolist() == [[1, 0]]
    sampler = AbsorbingSampler(tiny_denoiser())
    with pytest.raises(BenchError, match="steps in 1..16"):
        sampler.sample(SampleNoise(0, range(2)), SamplerSettings("absorbing", 17, 1.0))


def test_inverse_cdf_draw_matches_probabilities_and_skips_zero_mass():
    logits = torch.log(torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3]))
    u = torch.linspace(0, 1, 100001)[:-1]
    draws = draw_tokens(logits.expand(len(u), 5), u, 1.0)
    freq = torch.bincount(draws, minlength=5).float() / len(u)
    assert torch.allclose(freq, torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3]), atol=1e-4)
    assert draw_tokens(logits[None], torch.zeros(1), 1.0).item() == 1  # u = 0 never picks a zero-mass token


def test_nan_logits_are_an_error():
    with pytest.raises(BenchError, match="NaN"):
        draw_tokens(torch.tensor([[float("nan"), 0.0]]), torch.rand(1), 1.0)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    # top-p 0.6: 0.4 alone is below 0.6, 0.4 + 0.3 reaches it -> keep {1, 3}
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[True, False, True, False]]
    # top-p 0.7 is reached exactly by 0.4 + 0.3
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert torch.isinf(filter_logits(logits, top_p=0.05)).tolist() == [[True, False, True, True]]
    assert not torch.isinf(filter_logits(logits, top_k=4, top_p=1.0)).any()


# ----------------------------------------------------------------------------- loss types by hand

def hand_case(t):
    # two tokens, both masked, uniform logits over two classes: cross-entropy ln 2 per token
    logits = torch.zeros(1, 2, 2)
    x0 = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, True]])
    return logits, x0, mask, torch.tensor([t])


@pytest.mark.parametrize("t", [1, 2])
def test_loss_types_by_hand(t):
    T = 2
    logits, x0, mask, tt = hand_case(t)
    ce = 2 * math.log(2)
    loss, vb = loss_from_logits(logits, x0, mask, tt, T, "elbo")
    assert loss.item() == pytest.approx(ce / t * T / (math.log(2) * 2))   # 2/t bits per token
    assert vb.item() == pytest.approx(loss.item())
    loss, _ = loss_from_logits(logits, x0, mask, tt, T, "reweighted_elbo")
    assert loss.item() == pytest.approx((1 - t / T) * ce / (math.log(2) * 2))  # 0.5 at t=1, 0 at t=2
    loss, _ = loss_from_logits(logits, x0, mask, tt, T, "mlm")
    assert loss.item() == pytest.approx(math.log(2))  # mean CE over the 2 masked tokens


def test_loss_ignores_unmasked_positions_and_rejects_unknown_type():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 0.0]]])
    x0 = torch.tensor([[1, 0]])
    mask = torch.tensor([[False, True]])  # the badly predicted first token is not masked
    loss, _ = loss_from_logits(logits, x0, mask, torch.tensor([1]), 2, "mlm")
    assert loss.item() == pytest.approx(math.log(2))
    with pytest.raises(BenchError, match="loss_type"):
        loss_from_logits(logits, x0, mask, torch.tensor([1]), 2, "l2")


def test_masking_rate_is_t_over_T():
    x0 = torch.zeros(4000, 64, dtype=torch.long)
    t = torch.full((4000,), 16)
    x_t, mask = mask_tokens(x0, t, 64, mask_id=99, generator=torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.25) < 0.005  # sd ~ 0.0007
    assert (x_t[mask] == 99).all() and (x_t[~mask] == 0).all()


def test_rows_differing_only_in_temperature_share_one_timing(monkeypatch):
    from types import SimpleNamespace
    from bench import protocol
    timed = []
    monkeypatch.setattr(protocol, "time_sampler", lambda pipe, sampler, settings: timed.append(settings) or
                        {"img_per_s": float(len(timed))})
    pipe = SimpleNamespace(timings={})
    rows = [SamplerSettings("absorbing", 16, 1.0), SamplerSettings("absorbing", 16, 0.8),
            SamplerSettings("absorbing", 64, 0.8), SamplerSettings("absorbing", 16, 0.0),
            SamplerSettings("absorbing", 16, 0.8, top_k=5)]
    out = [protocol.shared_timing(pipe, None, r, r.slug()) for r in rows]
    assert [o["timed_with"] for o in out] == [None, "absorbing-s16-t1", None, None, None]
    assert [o["img_per_s"] for o in out] == [1.0, 1.0, 2.0, 3.0, 4.0] and len(timed) == 4
