"""Atoms on a tiny random Lumina2 transformer (``Lumina2AttnProcessor2_0``: grouped kv heads repeated
to the query heads before the call, per-head RMS QK-norm, RoPE, the host's own softmax scale; the
refiners over caption or image alone, ``layers`` over the joint ``[caption, image]`` sequence)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

from atomtune import AtomConfig, AtomModel
from atomtune.errors import AtomtuneError
from host_helpers import (
    check_identity_and_gradients,
    check_round_trip_masks_and_prune,
    lumina2_inputs,
    naive_delta_and_values,
    run,
    tiny_lumina2,
    trained_looking,
)

MODULES = ["noise_refiner.0.attn", "context_refiner.0.attn", "layers.0.attn", "layers.1.attn"]


def lumina2_reference(attn, atoms, x, keep, rope, scale):
    """Query heads over grouped kv heads, each kv head shared by ``heads / kv_heads`` consecutive
    query heads; QK-norm and RoPE on q, k; padded tokens masked out as keys; ``to_out``."""
    heads = attn.heads
    q = attn.to_q(x).unflatten(-1, (heads, -1))
    k, v = (p(x).unflatten(-1, (-1, q.shape[-1])) for p in (attn.to_k, attn.to_v))
    q, k = (apply_rotary_emb(n(t), rope, use_real=False) for n, t in [(attn.norm_q, q), (attn.norm_k, k)])
    share = heads // k.shape[2]
    k, v = (t.repeat_interleave(share, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    bias = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, -torch.inf)[:, None]
    values, delta = naive_delta_and_values(q, k, v, x @ atoms.W_s, atoms, bias=bias, scale=scale)
    return attn.to_out[0](values + delta)


@pytest.mark.parametrize("base_sequence_length", [None, 8])  # 8: proportional attention, sqrt(log_8 N)·scale
@pytest.mark.parametrize("num_atoms", [6, 4])  # 4 atoms over 3 query heads: an uneven split (2, 2, 0)
def test_lumina2_joint_layer_matches_naive_reference(num_atoms, base_sequence_length):
    model, inputs = tiny_lumina2(), lumina2_inputs()
    atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms))
    trained_looking(atoms)
    attn = model.layers[1].attn
    _, _, _, rope, _, lengths = model.rope_embedder(inputs["hidden_states"], inputs["encoder_attention_mask"])
    keep = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # (B, N): padded tails
    x = torch.randn(2, max(lengths), 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    call = {"attention_mask": keep, "image_rotary_emb": rope, "base_sequence_length": base_sequence_length}
    scale = attn.scale
    if base_sequence_length is not None:
        scale *= math.sqrt(math.log(x.shape[1], base_sequence_length))
    with torch.no_grad():
        got = attn(x, x, **call)
        want = lumina2_reference(attn, atoms.atoms()["layers.1.attn"], x, keep, rope, scale)
        with atoms.disable():
            bare = attn(x, x, **call)
    rows = keep[..., None]  # rows of padded query tokens are the host's don't-care
    assert torch.allclose(got * rows, want * rows, atol=1e-10), ((got - want) * rows).abs().max()
    assert (got - bare).abs().max() > 1e-3  # the atoms do act


def test_lumina2_identity_at_step_zero_and_gradients():
    atoms = check_identity_and_gradients(tiny_lumina2(), lumina2_inputs(), AtomConfig(num_atoms=3))
    assert list(atoms.layers()) == MODULES
    joint_only = AtomModel(tiny_lumina2(), AtomConfig(num_atoms=3, target_modules=r"^layers\."))
    assert list(joint_only.layers()) == MODULES[2:]


def test_lumina2_round_trip_masks_prune_and_swap(tmp_path):
    inputs, keep = lumina2_inputs(), [1, 0, 0, 1, 0, 0]  # heads keep 1, 1, 0 atoms
    model = check_round_trip_masks_and_prune(tiny_lumina2, inputs, AtomConfig(num_atoms=6), keep, 3, tmp_path)
    model.noise_refiner[0].attn.set_processor(
        Lumina2AttnProcessor2_0()
    )  # the model has no set_attn_processor
    with pytest.raises(AtomtuneError, match=r"noise_refiner\.0\.attn: .*replaced by Lumina2AttnProcessor2_0"):
        run(model, inputs)
