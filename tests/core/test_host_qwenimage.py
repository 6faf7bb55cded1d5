"""Atoms on a tiny random QwenImage transformer (``QwenDoubleStreamAttnProcessor2_0``: joint attention
over ``[text, image]`` keys, per-head RMS QK-norm and MSRoPE per stream, a bool joint mask)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import (
    assert_exact_and_acting,
    check_identity_and_gradients,
    check_round_trip_masks_and_prune,
    naive_delta_and_values,
    qwenimage_inputs,
    run,
    tiny_qwenimage,
    trained_looking,
)

MODULES = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


def qwen_reference(attn, atoms, hs, ehs, keep, rope, per_stream):
    """Keys ``[text, image]``; each stream's q, k normed and rotated with its own frequencies; padded
    text keys masked out; rows split into ``(to_out(image), to_add_out(text))``."""

    def split(x):
        return x.unflatten(-1, (attn.heads, -1))  # (B, N, H, d)

    width = hs.shape[-1]
    img_freqs, txt_freqs = rope
    q, k, v = (split(p(hs)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q2, k2, v2 = (split(p(ehs)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    q, k = (
        apply_rotary_emb_qwen(n(x), img_freqs, use_real=False)
        for n, x in [(attn.norm_q, q), (attn.norm_k, k)]
    )
    q2, k2 = (
        apply_rotary_emb_qwen(n(x), txt_freqs, use_real=False)
        for n, x in [(attn.norm_added_q, q2), (attn.norm_added_k, k2)]
    )
    q, k, v = (torch.cat([t, i], 1).transpose(1, 2) for t, i in [(q2, q), (k2, k), (v2, v)])
    c = torch.cat(
        [
            ehs @ (atoms.W_s[width:] if per_stream else atoms.W_s),
            hs @ (atoms.W_s[:width] if per_stream else atoms.W_s),
        ],
        1,
    )
    joint_keep = torch.cat([keep, torch.ones(hs.shape[:2], dtype=torch.bool)], 1)
    bias = torch.zeros(joint_keep.shape, dtype=hs.dtype).masked_fill(~joint_keep, -torch.inf)[:, None]
    values, delta = naive_delta_and_values(q, k, v, c, atoms, bias=bias)
    out = values + delta
    n = ehs.shape[1]
    return attn.to_out[0](out[:, n:]), attn.to_add_out(out[:, :n])


@pytest.mark.parametrize("encoder", ["shared", "per_stream"])
@pytest.mark.parametrize("num_atoms", [8, 6])  # 6 atoms over 4 heads: an uneven split (2, 2, 2, 0)
def test_qwenimage_module_matches_naive_reference(num_atoms, encoder):
    model = tiny_qwenimage()
    atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms, joint_encoder=encoder))
    trained_looking(atoms)
    attn = model.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 16, 64, generator=g, dtype=torch.float64)
    ehs = torch.randn(2, 6, 64, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, -2:] = False
    rope = model.pos_embed([(1, 4, 4)] * 2, max_txt_seq_len=6)
    call = {"encoder_hidden_states_mask": keep, "image_rotary_emb": rope}
    with torch.no_grad():
        got = attn(hs, ehs, **call)
        want = qwen_reference(attn, atoms.atoms()[MODULES[1]], hs, ehs, keep, rope, encoder == "per_stream")
        with atoms.disable():
            bare = attn(hs, ehs, **call)
    assert_exact_and_acting(got, want, bare)


def test_qwenimage_identity_at_step_zero_and_gradients():
    config = AtomConfig(num_atoms=4, attention="joint")
    atoms = check_identity_and_gradients(tiny_qwenimage(), qwenimage_inputs(), config)
    assert sorted(atoms.layers()) == MODULES


def test_qwenimage_round_trip_masks_prune_and_swap(tmp_path):
    inputs = qwenimage_inputs()
    config = AtomConfig(num_atoms=8, joint_encoder="per_stream")
    keep = [1, 0, 0, 1, 1, 0, 0, 0]  # heads keep 1, 1, 1, 0 atoms: pads inert ones
    model = check_round_trip_masks_and_prune(tiny_qwenimage, inputs, config, keep, 4, tmp_path)
    model.set_attn_processor(QwenDoubleStreamAttnProcessor2_0())
    with pytest.raises(
        AtomtuneError, match=r"transformer_blocks\.0\.attn: .*replaced by QwenDoubleStreamAttnProcessor2_0"
    ):
        run(model, inputs)
