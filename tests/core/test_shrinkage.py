"""Each shrinkage produces zeros at the rate its setting implies."""

from __future__ import annotations

import math

import pytest
import torch

from atomtune import AtomConfig, AtomModel
from atomtune.core.shrinkage import relu_threshold, shrink, soft_threshold, topk_threshold


def test_soft_threshold_values_and_zero_rate():
    z = torch.randn(200_000, 4, dtype=torch.float64)
    lam = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    s = soft_threshold(z, lam)
    # values: shrunk toward zero by λ, sign kept
    nz = s != 0
    assert torch.allclose(s[nz].abs(), (z.abs() - lam.expand_as(z))[nz])
    assert torch.equal(torch.sign(s[nz]), torch.sign(z[nz]))
    # zero rate per atom: P(|z| <= λ) = erf(λ/√2) for standard normal z
    rate = (s == 0).double().mean(0)
    expected = torch.tensor([math.erf(x / math.sqrt(2)) for x in lam.tolist()], dtype=torch.float64)
    assert torch.allclose(rate, expected, atol=5e-3)


def test_relu_threshold_zero_rate():
    z = torch.randn(200_000, 3, dtype=torch.float64)
    lam = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    s = relu_threshold(z, lam)
    assert (s >= 0).all()
    rate = (s == 0).double().mean(0)
    expected = torch.tensor(
        [0.5 * (1 + math.erf(x / math.sqrt(2))) for x in lam.tolist()], dtype=torch.float64
    )
    assert torch.allclose(rate, expected, atol=5e-3)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_keeps_exactly_k_largest_per_token(k):
    z = torch.randn(50, 4, 12)
    s = topk_threshold(z, k)
    assert torch.equal((s != 0).sum(-1), torch.full((50, 4), k))
    kept_min = s.abs().masked_fill(s == 0, float("inf")).min(-1).values
    dropped_max = z.abs().masked_fill(s != 0, 0).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert torch.equal(s[s != 0], z[s != 0])


def test_unknown_shrinkage():
    with pytest.raises(ValueError, match="unknown shrinkage 'hard'"):
        shrink(torch.zeros(2), "hard")


def test_topk_rate_inside_model():
    """Through a real adapted model: exactly k of M coefficients per token are non-zero."""
    from atomtune.core.stats import AtomStatistics
    from atomtune.tiny import tiny_pixart, tiny_pixart_inputs

    model = tiny_pixart()
    atoms = AtomModel(model, AtomConfig(num_atoms=8, shrinkage="topk", topk=3))
    with torch.no_grad(), AtomStatistics(atoms) as stats:
        model(**tiny_pixart_inputs())
    for freq in stats.frequency().values():
        assert math.isclose(float(freq.sum()), 3.0, rel_tol=1e-9)


def test_soft_rate_inside_model_follows_lambda():
    """A larger fixed λ gives more zeros; λ = 0 gives (almost) none."""
    from atomtune.core.stats import AtomStatistics
    from atomtune.tiny import tiny_pixart, tiny_pixart_inputs

    rates = []
    for lam in (0.0, 0.3, 3.0):
        model = tiny_pixart()
        atoms = AtomModel(model, AtomConfig(num_atoms=8, lambda_init=lam, learn_lambda=False))
        with torch.no_grad(), AtomStatistics(atoms) as stats:
            model(**tiny_pixart_inputs())
        rates.append(1 - float(torch.cat(list(stats.frequency().values())).mean()))
    assert rates[0] < 0.01 < rates[1] < rates[2]
    assert rates[2] > 0.9
