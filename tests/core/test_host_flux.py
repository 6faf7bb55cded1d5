"""Atoms on a tiny random Flux transformer (``FluxAttention``: double blocks joint over two streams,
single blocks over the joint sequence with no output projection of their own; RoPE on q, k)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import flux_inputs, naive_delta_and_values, tiny_flux, trained_looking

DOUBLE, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def flux_reference(attn, atoms, hs, ehs, rope, per_stream):
    """Keys ``[text, image]``, RoPE on the joint q, k; double blocks split the rows into
    ``(to_out(image), to_add_out(text))``, single blocks return the raw attention output."""

    def split(x):
        return x.unflatten(-1, (attn.heads, -1))  # (B, N, H, d)

    width = hs.shape[-1]
    q, k, v = (split(p(hs)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    c = hs @ (atoms.W_s[:width] if per_stream else atoms.W_s)
    if ehs is not None:
        q2, k2, v2 = (split(p(ehs)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q2, k2 = attn.norm_added_q(q2), attn.norm_added_k(k2)
        q, k, v = torch.cat([q2, q], 1), torch.cat([k2, k], 1), torch.cat([v2, v], 1)
        c = torch.cat([ehs @ (atoms.W_s[width:] if per_stream else atoms.W_s), c], 1)
    q = apply_rotary_emb(q, rope, sequence_dim=1)
    k = apply_rotary_emb(k, rope, sequence_dim=1)
    values, delta = naive_delta_and_values(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), c, atoms)
    out = values + delta
    if ehs is None:
        return (out,)
    n = ehs.shape[1]
    return attn.to_out[0](out[:, n:]), attn.to_add_out(out[:, :n])


@pytest.mark.parametrize("encoder", ["shared", "per_stream"])
@pytest.mark.parametrize("module", [DOUBLE, SINGLE])
def test_flux_module_matches_naive_reference(module, encoder):
    model = tiny_flux()
    atoms = AtomModel(model, AtomConfig(num_atoms=6, joint_encoder=encoder))
    trained_looking(atoms)
    attn = model.get_submodule(module)
    g = torch.Generator().manual_seed(5)
    text, image = 3, 5
    ids = torch.randint(0, 8, (text + image, 3), generator=g).double()
    rope = model.pos_embed(ids)
    if module == DOUBLE:
        hs = torch.randn(2, image, 32, generator=g, dtype=torch.float64)
        ehs = torch.randn(2, text, 32, generator=g, dtype=torch.float64)
    else:
        hs, ehs = torch.randn(2, text + image, 32, generator=g, dtype=torch.float64), None
    with torch.no_grad():
        got = attn(hs, ehs, image_rotary_emb=rope)
        got = got if isinstance(got, tuple) else (got,)
        want = flux_reference(attn, atoms.atoms()[module], hs, ehs, rope, encoder == "per_stream")
        with atoms.disable():
            bare = attn(hs, ehs, image_rotary_emb=rope)
            bare = bare if isinstance(bare, tuple) else (bare,)
    for g_, w_, b_ in zip(got, want, bare, strict=True):
        assert torch.allclose(g_, w_, atol=1e-10), (g_ - w_).abs().max()
        assert (g_ - b_).abs().max() > 1e-3


def test_flux_kinds_identity_and_gradients():
    model, inputs = tiny_flux(), flux_inputs()
    bare = run(model, inputs)
    atoms = AtomModel(model, AtomConfig(num_atoms=4, attention="joint"))
    assert sorted(atoms.layers()) == [SINGLE, DOUBLE]
    assert torch.allclose(run(model, inputs), bare, atol=1e-12)
    with atoms.disable():
        assert torch.allclose(run(model, inputs), bare, rtol=0, atol=1e-14)
    model(**inputs).sample.square().mean().backward()
    assert all(a.D.grad.abs().sum() > 0 for a in atoms.atoms().values())
    with pytest.raises(AtomtuneError, match="no module of FluxTransformer2DModel"):
        AtomModel(tiny_flux(), AtomConfig(num_atoms=2, attention="self"))


def test_flux_refuses_post_out():
    with pytest.raises(AtomtuneError, match="placement 'post_out' is not supported with FluxAttnProcessor"):
        AtomModel(tiny_flux(), AtomConfig(num_atoms=2, placement="post_out"))


def test_flux_round_trip_masks_and_prune(tmp_path):
    model, inputs = tiny_flux(), flux_inputs()
    bare = run(model, inputs)
    atoms = AtomModel(model, AtomConfig(num_atoms=8, joint_encoder="per_stream"))
    trained_looking(atoms)
    want = run(model, inputs)
    atoms.save(tmp_path / "adapter")
    loaded = AtomModel.load(tiny_flux(), tmp_path / "adapter")
    assert torch.allclose(run(loaded.model, inputs), want, rtol=0, atol=1e-14)
    atoms.set_masks({name: torch.zeros(8) for name in atoms.layers()})
    assert torch.allclose(run(model, inputs), bare, atol=1e-12)
    keep = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0])
    atoms.set_masks({name: keep for name in atoms.layers()})
    masked = run(model, inputs)
    assert set(atoms.prune().values()) == {4}
    assert torch.allclose(run(model, inputs), masked, atol=1e-12)


def test_flux_fused_projections_keep_the_atoms():
    """Flux fuses q, k, v without swapping processors; the channels come from the inputs, unchanged."""
    model, inputs = tiny_flux(), flux_inputs()
    trained_looking(AtomModel(model, AtomConfig(num_atoms=4)))
    want = run(model, inputs)
    model.fuse_qkv_projections()
    assert torch.allclose(run(model, inputs), want, atol=1e-12)


def test_flux_swaps_and_bypassing_backends_are_caught(monkeypatch):
    from diffusers.models.transformers import transformer_flux

    model, inputs = tiny_flux(), flux_inputs()
    AtomModel(model, AtomConfig(num_atoms=2))

    def naive_backend(query, key, value, **kwargs):  # what a non-SDPA backend (flash, sage) amounts to
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        a = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return (a @ v).transpose(1, 2)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", naive_backend)
    with pytest.raises(
        AtomtuneError, match="AtomFluxAttnProcessor made no scaled_dot_product_attention call"
    ):
        run(model, inputs)
    monkeypatch.undo()
    model.set_attn_processor(transformer_flux.FluxAttnProcessor())
    with pytest.raises(AtomtuneError, match="replaced by FluxAttnProcessor"):
        run(model, inputs)
