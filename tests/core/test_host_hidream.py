"""Atoms on a tiny random HiDream-I1 transformer (``HiDreamAttnProcessor``: double blocks over
``[image, text]`` keys with the text through ``to_q_t/k_t/v_t``, single blocks on the joint sequence;
RMSNorm across heads, RoPE, padded image tokens handled by multiplying their keys by the mask)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor, apply_rope

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import (
    assert_exact_and_acting,
    check_identity_and_gradients,
    check_round_trip_masks_and_prune,
    hidream_inputs,
    naive_delta_and_values,
    run,
    tiny_hidream,
    trained_looking,
)

DOUBLE, SINGLE = "double_stream_blocks.0.block.attn1", "single_stream_blocks.0.block.attn1"


def hidream_reference(attn, atoms, hs, ehs, keep, rope, per_stream):
    """Image keys times the mask; keys ``[image, text]``; RoPE over the whole head (the tiny model's
    head is as wide as its rotary axes); double blocks split the rows into
    ``(to_out(image), to_out_t(text))``, single blocks project all rows with ``to_out``."""

    def split(x):
        return x.unflatten(-1, (attn.heads, -1))  # (B, N, H, d)

    width = hs.shape[-1]
    q, k, v = (
        split(attn.q_rms_norm(attn.to_q(hs))),
        split(attn.k_rms_norm(attn.to_k(hs))),
        split(attn.to_v(hs)),
    )
    k = k * keep[..., None, None]
    c = hs @ (atoms.W_s[:width] if per_stream else atoms.W_s)
    if ehs is not None:
        q2, k2 = split(attn.q_rms_norm_t(attn.to_q_t(ehs))), split(attn.k_rms_norm_t(attn.to_k_t(ehs)))
        q, k, v = torch.cat([q, q2], 1), torch.cat([k, k2], 1), torch.cat([v, split(attn.to_v_t(ehs))], 1)
        c = torch.cat([c, ehs @ (atoms.W_s[width:] if per_stream else atoms.W_s)], 1)
    assert q.shape[-1] == rope.shape[-3] * 2  # full-width RoPE, no partial split
    q, k = apply_rope(q, k, rope)
    values, delta = naive_delta_and_values(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), c, atoms)
    out = values + delta
    if ehs is None:
        return attn.to_out(out)
    n = hs.shape[1]
    return attn.to_out(out[:, :n]), attn.to_out_t(out[:, n:])


@pytest.mark.parametrize("encoder", ["shared", "per_stream"])
@pytest.mark.parametrize("module", [DOUBLE, SINGLE])
def test_hidream_module_matches_naive_reference(module, encoder):
    model = tiny_hidream()
    atoms = AtomModel(model, AtomConfig(num_atoms=6, joint_encoder=encoder))  # 6 over 4 heads: 2, 2, 2, 0
    trained_looking(atoms)
    attn = model.get_submodule(module)
    g = torch.Generator().manual_seed(5)
    image, text = 6, 4
    ids = torch.cat([torch.randint(0, 8, (2, image, 3), generator=g), torch.zeros(2, text, 3)], 1).double()
    rope = model.pe_embedder(ids)
    keep = torch.ones(2, image + text, dtype=torch.float64)
    keep[0, image - 2 : image] = 0  # padded image tokens: the host zeroes their keys
    if module == DOUBLE:
        hs = torch.randn(2, image, 32, generator=g, dtype=torch.float64)
        ehs, keep = torch.randn(2, text, 32, generator=g, dtype=torch.float64), keep[:, :image]
    else:
        hs, ehs = torch.randn(2, image + text, 32, generator=g, dtype=torch.float64), None
    with torch.no_grad():
        got = attn(hs, keep, ehs, image_rotary_emb=rope)
        want = hidream_reference(attn, atoms.atoms()[module], hs, ehs, keep, rope, encoder == "per_stream")
        with atoms.disable():
            bare = attn(hs, keep, ehs, image_rotary_emb=rope)
    assert_exact_and_acting(got, want, bare)


@pytest.mark.parametrize("height", [8, 4])  # 4: non-square latents, padded and masked by the host
def test_hidream_kinds_identity_and_gradients(height):
    config = AtomConfig(num_atoms=4, attention="joint")
    atoms = check_identity_and_gradients(tiny_hidream(), hidream_inputs(height=height), config)
    assert list(atoms.layers()) == [DOUBLE, SINGLE]


def test_hidream_round_trip_masks_prune_and_swap(tmp_path):
    inputs = hidream_inputs()
    config = AtomConfig(num_atoms=8, joint_encoder="per_stream")
    keep = [1, 0, 0, 1, 1, 0, 0, 0]  # heads keep 1, 1, 1, 0 atoms: pads inert ones
    model = check_round_trip_masks_and_prune(tiny_hidream, inputs, config, keep, 4, tmp_path)
    model.get_submodule(SINGLE).set_processor(HiDreamAttnProcessor())  # the model has no set_attn_processor
    with pytest.raises(
        AtomtuneError, match=r"single_stream_blocks\.0\.block\.attn1: .*replaced by HiDreamAttnProcessor"
    ):
        run(model, inputs)
