"""Attention mode equals a naive reference that materialises A_h (float64, small sizes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from atomtune import AtomConfig, AtomModel
from atomtune.core.functional import (
    attention_with_atoms,
    head_padded_linear,
    head_width,
    naive_attention,
    split_heads,
)
from atomtune.core.hosts import diffusers as dx
from atomtune.core.hosts.diffusers import pads_through_weights
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


def test_head_padded_linear_matches_pad_and_cat():
    """One projection with the layout in its weight equals projecting, concatenating and padding."""
    b, length, c_in, heads, d, m = 2, 7, 12, 3, 4, 2
    x = torch.randn(b, length, c_in, dtype=torch.float64)
    weight, bias = (
        torch.randn(heads * d, c_in, dtype=torch.float64),
        torch.randn(heads * d, dtype=torch.float64),
    )
    w_s = torch.randn(c_in, heads * m, dtype=torch.float64)
    width = head_width(d, m)
    assert width == 8  # 4 + 2 rounded up: the zero padding is exercised
    v = split_heads(x @ weight.T + bias, heads)
    c = split_heads(x @ w_s, heads)
    want = torch.nn.functional.pad(torch.cat([v, c], -1), (0, width - d - m))
    got = head_padded_linear(x, weight, bias, heads, width, extra=w_s)
    assert torch.equal(got == 0, want == 0) and torch.allclose(got, want, atol=1e-12)
    q = head_padded_linear(x, weight, None, heads, width)
    assert torch.allclose(q[..., :d], split_heads(x @ weight.T, heads), atol=1e-12)
    assert not q[..., d:].any()


@pytest.fixture
def padded_on_cpu(monkeypatch):
    """The projection-built heads are for GPUs; these tests take that path on the CPU."""
    monkeypatch.setattr(dx, "PADDED_PROJECTION_DEVICES", ("cpu",))


def test_cpu_keeps_the_pad_and_concat_path():
    model, _, _ = _float32_and_reference("pre_out")
    attn = model.transformer_blocks[0].attn1
    assert not pads_through_weights(attn, attn.atoms.active, torch.randn(1, 3, 8))


def _float32_and_reference(placement: str, num_atoms: int = 6):
    """A float32 tiny PixArt with atoms (trained-looking D, one gain, one masked atom) and its float64 copy."""
    model = tiny_pixart(heads=2, head_dim=4)
    atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms, placement=placement, lambda_init=0.05))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in atoms.atoms().values():
            a.D.copy_(torch.randn(a.D.shape, generator=g))
            a.gain[1] = 2.0
            a.mask[2] = 0.0
    return model, atoms, copy.deepcopy(model).double()


@pytest.mark.parametrize("placement", ["pre_out", "post_out"])
@pytest.mark.parametrize("which", ["attn1", "attn2"])
@pytest.mark.parametrize("grad", [False, True])
def test_padded_projection_path_float32_matches_float64_reference(placement, which, grad, padded_on_cpu):
    """The widened heads built by the projections (channels stacked onto to_v without a gradient,
    added into the zero slots with one), float32, equal the naive float64 formulas to 1e-5."""
    model, _, ref_model = _float32_and_reference(placement)
    attn = getattr(model.transformer_blocks[0], which)
    ref_attn = getattr(ref_model.transformer_blocks[0], which)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    context = x if which == "attn1" else torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.ones(2, context.shape[1])
    keep[0, -2:] = 0
    bias = ((1 - keep) * -10000.0).unsqueeze(1).double()
    a = attn.atoms.active
    assert pads_through_weights(attn, a, context.float()) and head_width(4, 3) == 8  # 4 + 3 → 8: padded
    with torch.set_grad_enabled(grad):
        got = attn(
            x.float(),
            encoder_hidden_states=None if which == "attn1" else context.float(),
            attention_mask=bias.float(),
        )
    assert got.requires_grad == grad
    with torch.no_grad():
        want = _naive_adapted_attention(ref_attn, x, context, bias, ref_attn.atoms.active, placement)
    assert (got.detach().double() - want).abs().max() < 1e-5
    if grad:  # the gradient reaches W_s through the in-place add
        got.sum().backward()
        assert a.W_s.grad is not None and a.W_s.grad.abs().sum() > 0


def test_padded_projection_path_gradients_equal_the_unpadded_path(pixart_inputs, padded_on_cpu):
    """Training through the padded projections gives the same loss gradients as the pad/cat path."""
    model, atoms, _ = _float32_and_reference("pre_out", num_atoms=6)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(**pixart_inputs).sample
        (out.pow(2).mean() + atoms.regularization_loss()).backward()
        return [p.grad.clone() for p in atoms.trainable_parameters()]

    padded = grads()
    hooks = [attn.to_q.register_forward_hook(lambda *a: None) for attn in _attentions(model)]
    assert not pads_through_weights(
        _attentions(model)[0], atoms.atoms()["transformer_blocks.0.attn1"], pixart_inputs["hidden_states"]
    )
    unpadded = grads()
    for h in hooks:
        h.remove()
    assert len(padded) == len(unpadded) > 0
    for a, b in zip(padded, unpadded, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _attentions(model):
    return [m for m in model.modules() if hasattr(m, "atoms") and hasattr(m, "to_q")]
