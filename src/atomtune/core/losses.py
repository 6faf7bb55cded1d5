"""The two penalties added to the task loss.

L1 on the coefficients makes few atoms carry each token's update. Orthogonality of the normalised
atoms keeps their effects separable: the supplementary's expansion of an atom's influence through
later layers assumes ``⟨d_i, d_j⟩ = 0`` for ``i ≠ j``.
"""

from __future__ import annotations

import torch


def l1_sparsity(s: torch.Tensor) -> torch.Tensor:
    """Mean absolute coefficient."""
    return s.abs().mean()


def orthogonality(D: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean squared off-diagonal entry of ``D̂·D̂ᵀ`` (rows of ``D`` normalised); 0 iff orthogonal atoms."""
    d_hat = D / (D.norm(dim=1, keepdim=True) + eps)
    gram = d_hat @ d_hat.T
    off = gram - torch.diag_embed(gram.diagonal())
    m = D.shape[0]
    return off.pow(2).sum() / max(m * (m - 1), 1)
