"""Attention over extra value channels without materialising the attention map.

``A_h·Xc·W_s^h`` is attention applied to extra value channels ``c_h = Xc·W_s^h``. The fused path
widens each head's value by those channels and runs one scaled-dot-product call; q and k are
zero-padded to the same width, which leaves ``q·k`` unchanged, so the original scale is passed
explicitly. The naive reference (float64, explicit ``softmax(QKᵀ/√d)``) lives here too: it is what
the tests hold the fused path to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def attention_with_atoms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    c: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    fused: bool = True,
    pad_to: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A·v, A·c)`` per head, from one fused call (default) or two calls.

    Args:
        q: (B, H, N, d) queries. k, v: (B, H, L, d). c: (B, H, L, m) coefficient channels.
        attn_mask: anything ``F.scaled_dot_product_attention`` accepts, broadcast to (B, H, N, L).
        fused: widen the value heads (one call) instead of a second attention call.
        pad_to: the widened head size is rounded up to this multiple (kernel-friendly widths).

    Returns:
        ``(values, coefficients)`` of shapes (B, H, N, d) and (B, H, N, m).
    """
    d, m = q.shape[-1], c.shape[-1]
    scale = 1.0 / math.sqrt(d)
    c = c.to(v.dtype)
    if not fused:
        # channels padded to a kernel-friendly width too: with 2 atoms per head (after pruning)
        # the fast kernels refuse the call and PyTorch falls back to materialising the map
        out_v = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        wide_c = F.pad(c, (0, _round_up(m, pad_to) - m))
        out_c = F.scaled_dot_product_attention(q, k, wide_c, attn_mask=attn_mask, scale=scale)
        return out_v, out_c[..., :m]
    width = _round_up(d + m, pad_to)
    qk_pad = (0, width - d)
    wide_v = F.pad(torch.cat([v, c], dim=-1), (0, width - d - m))
    out = F.scaled_dot_product_attention(
        F.pad(q, qk_pad), F.pad(k, qk_pad), wide_v, attn_mask=attn_mask, scale=scale
    )
    return out[..., :d], out[..., d : d + m]


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: materialise ``A = softmax(QKᵀ/√d + mask)`` and return ``A·values`` (float64)."""
    q, k, values = q.double(), k.double(), values.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.double()
    return scores.softmax(dim=-1) @ values
