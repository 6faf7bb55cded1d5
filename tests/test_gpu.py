"""On a GPU (skipped elsewhere): the fused attention path equals the naive reference in bf16."""

from __future__ import annotations

import pytest
import torch

from atomtune.core.functional import attention_with_atoms, naive_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("fused", [True, False])
def test_fused_path_matches_reference_in_bf16(fused):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, length, d, m = 2, 16, 1024, 300, 72, 16
    q, k, v = (torch.randn(b, h, x, d, device="cuda", generator=g) for x in (n, length, length))
    c = torch.randn(b, h, length, m, device="cuda", generator=g)
    mask = torch.zeros(b, 1, 1, length, device="cuda")
    mask[0, ..., 200:] = -10000.0
    args = [t.bfloat16() for t in (q, k, v, c)]
    out_v, out_c = attention_with_atoms(*args, mask.bfloat16(), fused=fused)
    ref_v, ref_c = naive_attention(q, k, v, mask), naive_attention(q, k, c, mask)
    assert (out_v.double() - ref_v).abs().max() < 3e-2
    assert (out_c.double() - ref_c).abs().max() < 3e-2


@cuda
@pytest.mark.parametrize("grad", [False, True])
def test_padded_projection_path_matches_reference_in_bf16(grad):
    """The widened heads built by the projections (``head_padded_linear``: W_s stacked onto to_v
    without a gradient, added into the zero slots with one), bf16 at PixArt-Σ's head size, against
    the float64 formulas."""
    import copy

    from atomtune import AtomConfig, AtomModel
    from atomtune.core.hosts.diffusers import pads_through_weights
    from atomtune.tiny import tiny_pixart

    torch.manual_seed(0)
    model = tiny_pixart(heads=16, head_dim=72, layers=1)
    atoms = AtomModel(model, AtomConfig(num_atoms=64, lambda_init=0.01))
    with torch.no_grad():
        for a in atoms.atoms().values():
            a.D.normal_(std=0.05)
    ref = copy.deepcopy(model).double()
    model = model.cuda().bfloat16()  # adapters stay float32, as on a half-precision host
    attn, ref_attn = model.transformer_blocks[0].attn2, ref.transformer_blocks[0].attn2
    ref_attn.to_q.register_forward_hook(lambda *args: None)  # a hook: the reference takes the pad/cat path
    x = torch.randn(2, 1024, 1152, dtype=torch.float64)
    context = torch.randn(2, 300, 1152, dtype=torch.float64)
    bias = torch.zeros(2, 1, 300, dtype=torch.float64)
    bias[0, :, 200:] = -10000.0
    assert pads_through_weights(attn, attn.atoms.active, context.cuda().bfloat16())
    assert not pads_through_weights(ref_attn, ref_attn.atoms.active, context)
    with torch.set_grad_enabled(grad):
        got = attn(
            x.cuda().bfloat16(),
            encoder_hidden_states=context.cuda().bfloat16(),
            attention_mask=bias.cuda().bfloat16(),
        )
    with torch.no_grad():
        want = ref_attn(x, encoder_hidden_states=context, attention_mask=bias)  # held to the naive formulas
        scale = want.abs().max()
    assert ((got.detach().double().cpu() - want).abs().max() / scale) < 3e-2
