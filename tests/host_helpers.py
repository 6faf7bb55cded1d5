"""The tiny SD3, Flux and Sana transformers (``atomtune.tiny``) and naive float64
references for one adapted attention module: attention maps materialised, ``ΔO`` term by term."""

from __future__ import annotations

import math

import torch

from atomtune.tiny import flux_inputs, sana_inputs, sd3_inputs, tiny_flux, tiny_sana, tiny_sd3  # noqa: F401


def trained_looking(atom_model, seed: int = 3) -> None:
    """Non-zero ``D``, one gain and one masked atom per module: every term of ``ΔO`` is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in atom_model.atoms().values():
            a.D.copy_(torch.randn(a.D.shape, generator=g, dtype=a.D.dtype))
            a.W_s.copy_(torch.randn(a.W_s.shape, generator=g, dtype=a.W_s.dtype))
            a.lam.fill_(0.05)
            a.gain[1] = 2.0
            a.mask[2] = 0.0


def soft(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - lam.abs(), min=0)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def naive_delta_and_values(q, k, v, c, atoms, bias=None, kernel=None):
    """Per head, materialise A_h (softmax(q kᵀ/√d + bias), or ``kernel(q_h, k_h)``), then
    ``Σ_h`` columns: values ``A_h v_h`` and ``ΔO = σ_λ(concat_h A_h c_h)·diag(mask·gain)·D``."""
    heads = q.shape[1]
    m = -(-c.shape[-1] // heads)  # atom j belongs to head j // ceil(M/H)
    values, coeffs = [], []
    for h in range(heads):
        if kernel is None:
            scores = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(q.shape[-1])
            a_h = (scores if bias is None else scores + bias).softmax(-1)
        else:
            a_h = kernel(q[:, h], k[:, h])
        values.append(a_h @ v[:, h])
        coeffs.append(a_h @ c[..., h * m : (h + 1) * m])
    s = soft(torch.cat(coeffs, -1), atoms.lam)
    delta = s @ (atoms.D * (atoms.mask * atoms.gain)[:, None])
    return torch.cat(values, -1), delta
