"""Atoms on a tiny random Sana transformer: linear (ReLU) self-attention through atomtune's own small
processor, softmax cross-attention to the caption through the host's widened processor."""

from __future__ import annotations

import pytest
import torch

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import naive_delta_and_values, sana_inputs, tiny_sana, trained_looking


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def linear_map(q, k):
    """Sana's attention map, materialised: ``φq·φkᵀ`` over its row sums (``φ = ReLU``, host's eps)."""
    s = q.relu() @ k.relu().transpose(-1, -2)
    return s / (s.sum(-1, keepdim=True) + 1e-15)


def heads(x, h):
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


@pytest.mark.parametrize("num_atoms", [6, 5])  # 5 atoms over 2 heads: an uneven split (3 + 2)
@pytest.mark.parametrize("which", ["attn1", "attn2"])
def test_sana_module_matches_naive_reference(which, num_atoms):
    model = tiny_sana()
    atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms))
    trained_looking(atoms)
    attn = model.transformer_blocks[0].get_submodule(which)
    a = atoms.atoms()[f"transformer_blocks.0.{which}"]
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 9, 8, generator=g, dtype=torch.float64)
    ehs, bias, kernel = None, None, linear_map
    if which == "attn2":
        ehs, kernel = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), None
        keep = torch.ones(2, 5, dtype=torch.float64)
        keep[0, -2:] = 0
        bias = ((1 - keep) * -10000.0).unsqueeze(1)  # what the Sana model passes: (B, 1, L)
    context = hs if ehs is None else ehs
    with torch.no_grad():
        got = attn(hs, encoder_hidden_states=ehs, attention_mask=bias)
        q, k, v = heads(attn.to_q(hs), 2), heads(attn.to_k(context), 2), heads(attn.to_v(context), 2)
        values, delta = naive_delta_and_values(q, k, v, context @ a.W_s, a, bias=bias, kernel=kernel)
        want = attn.to_out[0](values + delta)
        with atoms.disable():
            bare = attn(hs, encoder_hidden_states=ehs, attention_mask=bias)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    assert (got - bare).abs().max() > 1e-3


def test_sana_kinds_and_identity_at_step_zero():
    """Sana's own linear attention runs in float32, so the identity holds to float32 rounding."""
    model, inputs = (
        tiny_sana().float(),
        {k: v.float() if v.is_floating_point() else v for k, v in sana_inputs().items()},
    )
    bare = run(model, inputs)
    atoms = AtomModel(model, AtomConfig(num_atoms=4))
    assert {n.rsplit(".", 1)[1] for n in atoms.layers()} == {"attn1", "attn2"}
    assert torch.allclose(run(model, inputs), bare, atol=1e-5)
    model(**inputs).sample.square().mean().backward()
    assert all(a.D.grad.abs().sum() > 0 for a in atoms.atoms().values())
    assert len(AtomModel(tiny_sana(), AtomConfig(num_atoms=2, attention="self")).layers()) == 2
    assert len(AtomModel(tiny_sana(), AtomConfig(num_atoms=2, attention="cross")).layers()) == 2


def test_sana_round_trip_masks_prune_and_swap(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model, inputs = tiny_sana(), sana_inputs()
    atoms = AtomModel(model, AtomConfig(num_atoms=8))
    trained_looking(atoms)
    want = run(model, inputs)
    atoms.save(tmp_path / "adapter")
    loaded = AtomModel.load(tiny_sana(), tmp_path / "adapter")
    assert torch.allclose(run(loaded.model, inputs), want, rtol=0, atol=1e-14)
    with atoms.disable():
        bare_off = run(model, inputs)
    atoms.set_masks({name: torch.zeros(8) for name in atoms.layers()})
    assert torch.allclose(run(model, inputs), bare_off, atol=1e-6)  # linear attention: float32 host
    atoms.set_masks({name: torch.tensor([1, 0, 1, 1, 1, 0, 0, 0]) for name in atoms.layers()})
    masked = run(model, inputs)
    assert set(atoms.prune().values()) == {6}
    assert torch.allclose(run(model, inputs), masked, atol=1e-12)
    model.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(AtomtuneError, match=r"transformer_blocks\.0\.attn1: .*replaced by AttnProcessor2_0"):
        run(model, inputs)


def test_uneven_split_prunes_and_round_trips(tmp_path):
    """Sana-1600M has 70 self-attention heads: atoms need not divide over them."""
    model, inputs = tiny_sana(), sana_inputs()
    atoms = AtomModel(model, AtomConfig(num_atoms=7))
    trained_looking(atoms)
    full = run(model, inputs)
    atoms.save(tmp_path / "uneven")
    loaded = AtomModel.load(tiny_sana(), tmp_path / "uneven")
    assert torch.allclose(run(loaded.model, inputs), full, rtol=0, atol=1e-14)
    atoms.set_masks({name: torch.tensor([1, 1, 0, 0, 1, 0, 1]) for name in atoms.layers()})
    masked = run(model, inputs)
    assert set(atoms.prune().values()) == {4}  # head 0 keeps atoms 0, 1; head 1 keeps 4, 6
    assert torch.allclose(run(model, inputs), masked, atol=1e-12)
    with pytest.raises(AtomtuneError, match="concat merge needs atoms split evenly"):
        loaded.merge("default", "default", "both", how="concat")
