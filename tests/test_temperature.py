"""Draws at temperature T follow softmax(logits / T): chi-square goodness of fit at T = 0.5 and 2,
for the shared token draw and through every sampler.

Each check draws 20,000 tokens per position over 8 classes and requires p > 1e-6, so correct code
fails with probability about 1e-6 per check (and never, with the fixed seeds). The same draws
scored against the other temperature's distribution, which is what `logits * temperature` in place
of `logits / temperature` would produce (logits * T = logits / (1/T), and 1/0.5 = 2), must give
p < 1e-30: every check here shows its own power. The networks are tiny random transformers whose
output head is scaled so that the two temperatures' distributions differ in total variation by
more than 0.3 (asserted).
"""
import numpy as np
import pytest
import torch
from scipy.stats import chi2

from bench.models import Transformer, TransformerConfig
from bench.samplers import SampleNoise, SamplerSettings, draw_tokens
from bench.samplers.registry import SAMPLERS

DRAWS = 20_000
CODEBOOK, SEQ_LEN = 8, 4
P_PASS, P_POWER = 1e-6, 1e-30
TEMPERATURES = (0.5, 2.0)
SWAPPED = {0.5: 2.0, 2.0: 0.5}


# ----------------------------------------------------------------------------- the one place that
# knows how samplers are built and where each one's first draw comes from

def make_sampler(name: str, priors: dict):
    cls = SAMPLERS[name]
    return cls(priors[cls.prior_kind])


def first_draws(name: str, priors: dict, temperature: float) -> tuple[np.ndarray, torch.Tensor]:
    """-> (tokens (DRAWS, P) at the P positions whose distribution is known, their logits (P, V)).
    absorbing and maskgit with 1 step draw every position once from the all-masked input;
    autoregressive draws its first token given the start token alone."""
    sampler = make_sampler(name, priors)
    if SAMPLERS[name].takes_steps:
        net = priors["absorbing"]
        settings = SamplerSettings(name, 1, temperature)
        logits = net(torch.full((1, SEQ_LEN), net.cfg.mask_id))[0]
        positions = slice(None)
    else:
        net = priors["autoregressive"]
        settings = SamplerSettings(name, None, temperature)
        logits = net(torch.zeros((1, 0), dtype=torch.long))[0, :1]
        positions = slice(0, 1)
    with torch.no_grad():
        tokens = sampler.sample(SampleNoise(7, range(DRAWS)), settings)
    return tokens[:, positions].numpy(), logits.detach()


# -----------------------------------------------------------------------------


def tiny(causal: bool, seed: int) -> Transformer:
    torch.manual_seed(seed)
    net = Transformer(TransformerConfig(codebook_size=CODEBOOK, block_size=SEQ_LEN, n_layers=1, n_head=2,
                                        n_emb=16, causal=causal)).eval()
    with torch.no_grad():
        net.pos_emb.normal_()
        net.start_tok.normal_()
        probe = net(torch.full((1, SEQ_LEN), CODEBOOK) if not causal else torch.zeros((1, 0), dtype=torch.long))
        net.head.weight.mul_(1.5 / probe.std())  # logits with SD 1.5: temperature matters a lot
    return net


@pytest.fixture(scope="module")
def priors():
    return {"absorbing": tiny(False, 0), "autoregressive": tiny(True, 1)}


def probabilities(logits: torch.Tensor, temperature: float) -> np.ndarray:
    return torch.softmax(logits.double() / temperature, -1).numpy()


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """(statistic, degrees of freedom) of the draws `tokens` (n,) under the class probabilities
    `probs` (V,), classes expected fewer than 5 times pooled into one (the chi-square approximation
    needs that). A draw of a class of probability 0 gives an infinite statistic."""
    counts = np.bincount(tokens, minlength=len(probs)).astype(float)
    expected = probs * len(tokens)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    if (counts[expected == 0] > 0).any():
        return float("inf"), len(expected) - 1
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def chi_square_p(tokens: np.ndarray, probs: np.ndarray) -> float:
    return float(chi2.sf(*chi_square(tokens, probs)))


def joint_p(tokens: np.ndarray, logits: torch.Tensor, temperature: float) -> float:
    """One p-value over independent positions (tokens (n, P), logits (P, V)): the chi-square
    statistics and their degrees of freedom add up."""
    parts = [chi_square(tokens[:, p], probabilities(logits[p], temperature)) for p in range(tokens.shape[1])]
    return float(chi2.sf(sum(s for s, _ in parts), sum(d for _, d in parts)))


def total_variation(logits: torch.Tensor) -> float:
    return 0.5 * float(np.abs(probabilities(logits, 0.5) - probabilities(logits, 2.0)).sum(-1).min())


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_shared_draw_follows_softmax_over_temperature(temperature):
    logits = torch.tensor([2.0, 1.2, 0.7, 0.0, -0.4, -1.0, -1.8, -3.0])
    assert total_variation(logits) > 0.3
    uniforms = SampleNoise(3, range(DRAWS)).rand(1)[:, 0]
    tokens = draw_tokens(logits.expand(DRAWS, -1), uniforms, temperature).numpy()
    assert chi_square_p(tokens, probabilities(logits, temperature)) > P_PASS
    assert chi_square_p(tokens, probabilities(logits, SWAPPED[temperature])) < P_POWER


def test_chi_square_accepts_a_fit_and_rejects_impossible_draws():
    probs = np.array([0.25, 0.25, 0.5, 0.0])
    tokens = np.repeat([0, 1, 2, 2], 2500)
    assert chi_square_p(tokens, probs) > 0.99
    assert chi_square_p(np.append(tokens, 3), probs) == 0.0


@pytest.mark.parametrize("name", ["absorbing", "autoregressive", "autoregressive-recompute", "maskgit"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_sampler_draws_follow_softmax_over_temperature(priors, name, temperature):
    tokens, logits = first_draws(name, priors, temperature)
    assert total_variation(logits) > 0.3
    assert joint_p(tokens, logits, temperature) > P_PASS
    assert joint_p(tokens, logits, SWAPPED[temperature]) < P_POWER
