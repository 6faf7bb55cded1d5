"""Atoms on a tiny random Wan text-to-video transformer (``WanAttnProcessor``: ``attn1`` self-attention
with RMSNorm across heads and 3-D RoPE, ``attn2`` cross-attention to the text); image-to-video refused."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import (
    assert_exact_and_acting,
    check_identity_and_gradients,
    check_round_trip_masks_and_prune,
    naive_delta_and_values,
    run,
    tiny_wan,
    trained_looking,
    wan_inputs,
)

SELF, CROSS = "blocks.1.attn1", "blocks.1.attn2"


def rotate(x, cos, sin):
    """Wan's RoPE on interleaved pairs, from the formula: (x1, x2) → (x1·cos − x2·sin, x1·sin + x2·cos)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def wan_reference(attn, atoms, hs, ehs, rope):
    """q, k normed over the full width, then split into heads; RoPE (self-attention only); one
    softmax over the context; ``to_out``."""
    context = hs if ehs is None else ehs
    q, k = attn.norm_q(attn.to_q(hs)), attn.norm_k(attn.to_k(context))
    q, k, v = (x.unflatten(-1, (attn.heads, -1)) for x in (q, k, attn.to_v(context)))  # (B, N, H, d)
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    values, delta = naive_delta_and_values(q, k, v, context @ atoms.W_s, atoms)
    return attn.to_out[0](values + delta)


@pytest.mark.parametrize("num_atoms", [6, 5])  # 5 atoms over 2 heads: an uneven split (3 + 2)
@pytest.mark.parametrize("module", [SELF, CROSS])
def test_wan_module_matches_naive_reference(module, num_atoms):
    model = tiny_wan()
    atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms))
    trained_looking(atoms)
    attn = model.get_submodule(module)
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 32, 24, generator=g, dtype=torch.float64)
    ehs, rope = None, model.rope(torch.zeros(2, 4, 2, 8, 8, dtype=torch.float64))
    if module == CROSS:
        ehs, rope = torch.randn(2, 6, 24, generator=g, dtype=torch.float64), None
    with torch.no_grad():
        got = attn(hs, ehs, None, rope)
        want = wan_reference(attn, atoms.atoms()[module], hs, ehs, rope)
        with atoms.disable():
            bare = attn(hs, ehs, None, rope)
    assert_exact_and_acting(got, want, bare)


def test_wan_kinds_identity_and_gradients():
    atoms = check_identity_and_gradients(tiny_wan(), wan_inputs(), AtomConfig(num_atoms=4))
    assert sorted(atoms.layers()) == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    for kind, suffix in [("self", "attn1"), ("cross", "attn2")]:
        names = AtomModel(tiny_wan(), AtomConfig(num_atoms=2, attention=kind)).layers()
        assert len(names) == 2 and all(n.endswith(suffix) for n in names)


def test_wan_round_trip_masks_prune_and_swap(tmp_path):
    inputs, keep = wan_inputs(), [1, 1, 0, 0, 1, 0, 0, 0]  # heads keep 2 and 1 atoms
    model = check_round_trip_masks_and_prune(tiny_wan, inputs, AtomConfig(num_atoms=8), keep, 4, tmp_path)
    model.set_attn_processor(WanAttnProcessor())
    with pytest.raises(AtomtuneError, match=r"blocks\.0\.attn1: .*replaced by WanAttnProcessor"):
        run(model, inputs)


def test_wan_image_to_video_is_refused():
    """I2V attends its image context in a second kernel call: a clear error, not silent wrong output."""
    i2v = {"image_dim": 8, "added_kv_proj_dim": 24}
    for kind in ("both", "cross"):
        with pytest.raises(AtomtuneError, match=r"second attention call.*Wan text-to-video only") as info:
            AtomModel(tiny_wan(**i2v), AtomConfig(num_atoms=4, attention=kind))
        assert "\n" not in str(info.value)
    assert len(AtomModel(tiny_wan(**i2v), AtomConfig(num_atoms=4, attention="self")).layers()) == 2
