"""Attention mode equals a naive reference that materialises A_h (float64, small sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from atomtune import AtomConfig, AtomModel
from atomtune.functional import attention_with_atoms, naive_attention
from atomtune.tiny import tiny_pixart


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_functional_matches_naive(fused, mask_kind):
    b, h, n, length, d, m = 2, 3, 5, 7, 4, 3
    q, k, v = (torch.randn(b, h, x, d, dtype=torch.float64) for x in (n, length, length))
    c = torch.randn(b, h, length, m, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, n, length) > 0.3
        mask[..., 0] = True  # every query sees at least one key
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, 1, length, dtype=torch.float64) * 3
    out_v, out_c = attention_with_atoms(q, k, v, c, mask, fused=fused)
    assert out_v.shape == (b, h, n, d) and out_c.shape == (b, h, n, m)
    assert torch.allclose(out_v, naive_attention(q, k, v, mask), atol=1e-10)
    assert torch.allclose(out_c, naive_attention(q, k, c, mask), atol=1e-10)


def _naive_adapted_attention(attn, x, context, bias, atoms, placement):
    """O' from the formulas: per head A_h = softmax(Q_h K_hᵀ/√d + bias), S = σ(concat_h A_h Xc W_s^h)."""
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // heads
    m = atoms.num_atoms // heads
    c = context @ atoms.W_s
    values, coeffs = [], []
    for hd in range(heads):
        scores = (
            q[..., hd * d : (hd + 1) * d] @ k[..., hd * d : (hd + 1) * d].transpose(-1, -2) / math.sqrt(d)
        )
        if bias is not None:
            scores = scores + bias
        a_h = scores.softmax(-1)  # (B, N, L): materialised on purpose
        values.append(a_h @ v[..., hd * d : (hd + 1) * d])
        coeffs.append(a_h @ c[..., hd * m : (hd + 1) * m])
    z = torch.cat(coeffs, -1)
    s = torch.sign(z) * torch.clamp(z.abs() - atoms.lam.abs(), min=0)
    delta = s @ (atoms.D * (atoms.mask * atoms.gain)[:, None])
    o = torch.cat(values, -1)
    if placement == "pre_out":
        return attn.to_out[0](o + delta)
    return attn.to_out[0](o) + delta


@pytest.mark.parametrize("placement", ["pre_out", "post_out"])
@pytest.mark.parametrize("which", ["attn1", "attn2"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_adapted_attention_module_matches_naive(placement, which, masked, fused):
    model = tiny_pixart(heads=2, head_dim=4).double()
    atoms = AtomModel(model, AtomConfig(num_atoms=6, placement=placement, fused=fused, lambda_init=0.05))
    attn = getattr(model.transformer_blocks[0], which)
    a = atoms.atoms()[f"transformer_blocks.0.{which}"]
    with torch.no_grad():
        a.D.normal_()
        a.gain[1] = 2.0
        a.mask[2] = 0.0
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    context = x if which == "attn1" else torch.randn(2, 5, 8, dtype=torch.float64)
    bias = None
    if masked:
        keep = torch.ones(2, context.shape[1])
        keep[0, -2:] = 0
        bias = ((1 - keep) * -10000.0).unsqueeze(1).double()  # diffusers' (B, 1, L) convention
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=None if which == "attn1" else context, attention_mask=bias)
        want = _naive_adapted_attention(attn, x, context, bias, a, placement)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
