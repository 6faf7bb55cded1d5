"""Attention over extra value channels without materialising the attention map.

``A_h·Xc·W_s^h`` is attention applied to extra value channels ``c_h = Xc·W_s^h``. The fused path
widens each head's value by those channels and runs one scaled-dot-product call; q and k are
zero-padded to the same width, which leaves ``q·k`` unchanged, so the original scale is passed
explicitly. ``head_padded_linear`` builds those widened heads inside the projections instead:
zero rows in the weight give the zero padding, and ``W_s`` stacked onto ``to_v``'s weight gives the
channels, so no activation is padded or concatenated per call. The naive reference (float64, explicit ``softmax(QKᵀ/√d)``) lives here too: it is what
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
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A·v, A·c)`` per head, from one fused call (default) or two calls.

    Args:
        q: (B, H, N, d) queries. k, v: (B, H, L, d). c: (B, H, L, m) coefficient channels.
        attn_mask: anything ``F.scaled_dot_product_attention`` accepts, broadcast to (B, H, N, L).
        fused: widen the value heads (one call) instead of a second attention call.
        pad_to: the widened head size is rounded up to this multiple (kernel-friendly widths).
        scale: the softmax scale; ``None`` means ``1/√d`` of the unpadded head (the padding would
            otherwise change SDPA's default).

    Returns:
        ``(values, coefficients)`` of shapes (B, H, N, d) and (B, H, N, m).
    """
    d, m = q.shape[-1], c.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
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


def head_width(head_dim: int, channels: int, pad_to: int = 8) -> int:
    """Width of a widened head: ``head_dim`` values, then ``channels`` coefficients, rounded up."""
    return _round_up(head_dim + channels, pad_to)


def head_padded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    heads: int,
    width: int,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x·Wᵀ + b`` split into heads of ``width`` columns: (B, L, C) → (B, H, L, width).

    Head h holds its ``d`` projected channels, then its share of ``x·extra`` (``extra`` is (C, M),
    M/H columns per head), then zeros: what ``F.pad(torch.cat([v, c], -1))`` gives, from one matmul
    whose weight carries the layout. The weight is rebuilt per call (a copy of C·H·width numbers,
    small against the activations at any useful token count), so edits to the host weights or to
    ``extra`` are never served stale.

    With ``extra`` requiring a gradient the stacked weight's gradient would cost a full-size
    product; add the channels into the zero slots instead (see ``hosts.diffusers``).
    """
    out_features, c_in = weight.shape
    d = out_features // heads
    m = 0 if extra is None else extra.shape[1] // heads
    parts = [weight.view(heads, d, c_in)]
    if extra is not None:
        parts.append(extra.t().reshape(heads, m, c_in).to(weight.dtype))
    if width > d + m:
        parts.append(weight.new_zeros(heads, width - d - m, c_in))
    wide = torch.cat(parts, dim=1).view(heads * width, c_in)
    wide_bias = None
    if bias is not None:
        wide_bias = F.pad(bias.view(heads, d), (0, width - d)).view(heads * width)
    b, length, _ = x.shape
    return F.linear(x, wide, wide_bias).view(b, length, heads, width).transpose(1, 2)


def attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    wide_v: torch.Tensor,
    head_dim: int,
    channels: int,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_atoms`` on heads already widened (``head_padded_linear``): q, k zero-padded
    and ``wide_v = [v | c | 0]`` per head, all (B, H, ·, width). Same ``(values, coefficients)``."""
    out = F.scaled_dot_product_attention(q, k, wide_v, attn_mask=attn_mask, scale=1.0 / math.sqrt(head_dim))
    return out[..., :head_dim], out[..., head_dim : head_dim + channels]


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
