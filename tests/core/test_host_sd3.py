"""Atoms on a tiny random SD3/SD3.5 transformer (joint attention through ``JointAttnProcessor2_0``)."""

from __future__ import annotations

import copy

import pytest
import torch

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import heads_of, naive_delta_and_values, sd3_inputs, tiny_sd3, trained_looking


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def sd3_reference(attn, atoms, hs, ehs, per_stream):
    """The joint module from the formulas: keys ``[image, text]``, image rows through ``to_out``,
    text rows through ``to_add_out`` (left unprojected in a ``context_pre_only`` block)."""
    heads, width = attn.heads, hs.shape[-1]
    q, k, v = (heads_of(p(hs), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    c = hs @ (atoms.W_s[:width] if per_stream else atoms.W_s)
    if ehs is not None:
        q2, k2, v2 = (heads_of(p(ehs), heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q2, k2 = attn.norm_added_q(q2), attn.norm_added_k(k2)
        q, k, v = torch.cat([q, q2], 2), torch.cat([k, k2], 2), torch.cat([v, v2], 2)
        c = torch.cat([c, ehs @ (atoms.W_s[width:] if per_stream else atoms.W_s)], 1)
    values, delta = naive_delta_and_values(q, k, v, c, atoms)
    out = values + delta
    n = hs.shape[1]
    image = attn.to_out[0](out[:, :n])
    if ehs is None:
        return image
    text = out[:, n:] if attn.context_pre_only else attn.to_add_out(out[:, n:])
    return image, text


@pytest.mark.parametrize("encoder", ["shared", "per_stream"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "module", ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
)
def test_joint_module_matches_naive_reference(module, encoder, fused):
    model = tiny_sd3()
    atoms = AtomModel(model, AtomConfig(num_atoms=6, joint_encoder=encoder, fused=fused))
    trained_looking(atoms)
    attn = model.get_submodule(module)
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    ehs = None if module.endswith("attn2") else torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = _as_tuple(attn(hs, encoder_hidden_states=ehs))
        want = _as_tuple(sd3_reference(attn, atoms.atoms()[module], hs, ehs, encoder == "per_stream"))
        with atoms.disable():
            bare = _as_tuple(attn(hs, encoder_hidden_states=ehs))
    for g_, w_, b_ in zip(got, want, bare, strict=True):
        assert torch.allclose(g_, w_, atol=1e-10), (g_ - w_).abs().max()
        assert (g_ - b_).abs().max() > 1e-3  # the atoms do act


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("encoder", ["shared", "per_stream"])
def test_equals_pretrained_at_step_zero_and_trains(encoder):
    model, inputs = tiny_sd3(), sd3_inputs()
    bare = run(model, inputs)
    atoms = AtomModel(model, AtomConfig(num_atoms=4, joint_encoder=encoder))
    assert torch.allclose(run(model, inputs), bare, atol=1e-12)
    with atoms.disable():  # the host's own call (threaded float64 sums may differ in the last bit)
        assert torch.allclose(run(model, inputs), bare, rtol=0, atol=1e-14)
    model(**inputs).sample.square().mean().backward()
    assert all(a.D.grad is not None and a.D.grad.abs().sum() > 0 for a in atoms.atoms().values())


def test_attention_kinds_select_joint_and_self_modules():
    for kind, want in [
        ("joint", ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]),
        ("self", ["transformer_blocks.0.attn2"]),
    ]:
        atoms = AtomModel(tiny_sd3(), AtomConfig(num_atoms=2, attention=kind))
        assert sorted(atoms.layers()) == want
    with pytest.raises(AtomtuneError, match="no module of SD3Transformer2DModel"):
        AtomModel(tiny_sd3(), AtomConfig(num_atoms=2, attention="cross"))


@pytest.mark.parametrize("encoder", ["shared", "per_stream"])
def test_save_load_round_trip_is_exact(tmp_path, encoder):
    model, inputs = tiny_sd3(), sd3_inputs()
    atoms = AtomModel(model, AtomConfig(num_atoms=4, joint_encoder=encoder))
    trained_looking(atoms)
    want = run(model, inputs)
    atoms.save(tmp_path / "adapter")
    loaded = AtomModel.load(tiny_sd3(), tmp_path / "adapter")
    for name, a in atoms.atoms().items():
        b = loaded.atoms()[name]
        assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("W_s", "D", "lam", "mask", "gain"))
    assert torch.allclose(run(loaded.model, inputs), want, rtol=0, atol=1e-14)
    other = "per_stream" if encoder == "shared" else "shared"
    with pytest.raises(AtomtuneError, match="joint_encoder"):
        loaded.add_adapter("other", AtomConfig(num_atoms=4, joint_encoder=other))


def test_masks_and_prune_behave_as_on_pixart():
    model, inputs = tiny_sd3(), sd3_inputs()
    bare = run(model, inputs)
    atoms = AtomModel(model, AtomConfig(num_atoms=8))
    trained_looking(atoms)
    atoms.reset_steering()
    full = run(model, inputs)
    atoms.set_masks({name: torch.zeros(8) for name in atoms.layers()})
    assert torch.allclose(run(model, inputs), bare, atol=1e-12)
    keep = torch.tensor([1, 0, 1, 1, 1, 0, 0, 0])  # 3 and 1 survivors per head: pads inert atoms
    atoms.set_masks({name: keep for name in atoms.layers()})
    masked = run(model, inputs)
    assert (masked - full).abs().max() > 1e-3
    sizes = atoms.prune()
    assert set(sizes.values()) == {6}
    assert torch.allclose(run(model, inputs), masked, atol=1e-12)


def test_processor_swap_after_injection_is_caught():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    model, inputs = tiny_sd3(), sd3_inputs()
    AtomModel(copy.deepcopy(model), AtomConfig(num_atoms=2))  # another copy's atoms do not interfere
    AtomModel(model, AtomConfig(num_atoms=2))
    model.set_attn_processor(JointAttnProcessor2_0())
    with pytest.raises(
        AtomtuneError, match=r"transformer_blocks\.0\.attn: .*replaced by JointAttnProcessor2_0"
    ):
        run(model, inputs)
    fused = tiny_sd3()
    AtomModel(fused, AtomConfig(num_atoms=2))
    fused.fuse_qkv_projections()
    with pytest.raises(AtomtuneError, match="replaced by FusedJointAttnProcessor2_0"):
        run(fused, inputs)


def test_unload_gives_back_the_host_processor():
    model, inputs = tiny_sd3(), sd3_inputs()
    bare = run(model, inputs)
    atoms = AtomModel(model, AtomConfig(num_atoms=4))
    trained_looking(atoms)
    atoms.unload()
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"
    assert torch.allclose(run(model, inputs), bare, rtol=0, atol=1e-14)
