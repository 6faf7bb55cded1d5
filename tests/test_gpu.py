"""On a GPU (skipped elsewhere): the fused attention path equals the naive reference in bf16."""

from __future__ import annotations

import pytest
import torch

from atomtune.functional import attention_with_atoms, naive_attention

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
