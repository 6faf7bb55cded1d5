"""Shrinkage functions σ_λ: they turn dense pre-activations ``z`` into sparse coefficients ``S``.

Sparsity is what makes atoms readable: with few non-zero coefficients per token, each atom's share
of the update can be measured, removed or scaled on its own.
"""

from __future__ import annotations

import torch

SHRINKAGES = ("soft", "relu", "topk")


def soft_threshold(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``sign(z)·max(|z| − λ, 0)``: the proximal map of the L1 norm (ISTA's step).

    Computed as ``z − clamp(z, −λ, λ)``, the same numbers in two kernels instead of four.
    """
    return z - torch.clamp(z, -lam, lam)


def relu_threshold(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``max(z − λ, 0)``: non-negative codes, an atom either adds or stays silent."""
    return torch.relu(z - lam)


def topk_threshold(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest ``|z|`` per token (last dimension), zero the rest."""
    k = min(k, z.shape[-1])
    idx = z.abs().topk(k, dim=-1).indices
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
    return z * keep


def shrink(z: torch.Tensor, kind: str, lam: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
    """Apply the shrinkage ``kind`` to ``z`` (..., M) with per-atom threshold ``lam`` (M,) or ``k``."""
    if kind == "soft":
        return soft_threshold(z, lam)
    if kind == "relu":
        return relu_threshold(z, lam)
    if kind == "topk":
        return topk_threshold(z, k)
    raise ValueError(f"unknown shrinkage {kind!r}; choose one of {', '.join(SHRINKAGES)}")
