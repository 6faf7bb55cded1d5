"""Choose atoms by importance, and remove the rest for good.

Masks (1 keep, 0 drop) come from an importance dict ``{module: (M,) tensor}``, typically
``AtomStatistics.contribution()``; ``AtomModel.set_masks`` applies them at inference without
touching trained parameters. ``prune`` then deletes masked atoms so the adapter runs and saves
smaller. In attention mode atoms are grouped by head (atom m belongs to head ``m // ceil(M/H)``) and
every head needs the same number of channels, so heads with fewer survivors are padded with inert
atoms (zero ``W_s`` and ``D``, masked, ``atom_ids == -1``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atomtune.core.layer import Atoms
from atomtune.errors import AtomtuneError

if TYPE_CHECKING:
    from atomtune.core.model import AtomModel

Importance = dict[str, torch.Tensor]
Masks = dict[str, torch.Tensor]


def top_k_masks(importance: Importance, k: int) -> Masks:
    """Keep the ``k`` most important atoms of each module."""
    if k < 0:
        raise AtomtuneError(f"k must be >= 0, got {k}")
    return {name: _keep(imp, imp.argsort(descending=True)[:k]) for name, imp in importance.items()}


def global_top_k_masks(importance: Importance, k: int) -> Masks:
    """Keep the ``k`` most important atoms over all modules together."""
    if k < 0:
        raise AtomtuneError(f"k must be >= 0, got {k}")
    names = list(importance)
    flat = torch.cat([importance[n].double() for n in names])
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[flat.argsort(descending=True)[:k]] = True
    return dict(zip(names, chosen.split([len(importance[n]) for n in names]), strict=True))


def share_masks(importance: Importance, share: float, per_module: bool = False) -> Masks:
    """Keep the fewest atoms whose contribution reaches ``share`` of the total (over all modules,
    or within each module with ``per_module=True``)."""
    if not 0.0 <= share <= 1.0:
        raise AtomtuneError(f"share must be in [0, 1], got {share}")
    if per_module:
        return {name: share_masks({name: imp}, share)[name] for name, imp in importance.items()}
    cumulative = (
        torch.cat([imp.double() for imp in importance.values()]).sort(descending=True).values.cumsum(0)
    )
    if share == 0 or cumulative[-1] <= 0:
        k = 0
    else:
        k = min(
            int(torch.searchsorted(cumulative, share * cumulative[-1] * (1 - 1e-12))) + 1, len(cumulative)
        )
    return global_top_k_masks(importance, k)


def _keep(imp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(len(imp), dtype=torch.bool)
    mask[indices] = True
    return mask


def prune(atom_model: AtomModel, adapter: str | None = None) -> dict[str, int]:
    """Drop the masked atoms of ``adapter`` for good; returns the new atom count per module."""
    adapter = adapter or atom_model.active_adapter
    config = atom_model.configs[adapter]
    sizes = {}
    for name, layer in atom_model.layers().items():
        if adapter not in layer.adapters:
            continue
        old: Atoms = layer.adapters[adapter]
        index = kept_positions(old.mask != 0, layer.heads)
        new = Atoms(old.W_s.shape[0], old.D.shape[1], len(index), config).to(old.D.device, old.D.dtype)
        new.atom_ids = new.atom_ids.to(old.atom_ids.device)
        with torch.no_grad():
            real = index >= 0
            safe = index.clamp(min=0)
            new.W_s.copy_(old.W_s[:, safe] * real)
            new.D.copy_(old.D[safe] * real[:, None])
            new.lam.copy_(old.lam[safe])
            new.mask.copy_(old.mask[safe] * real)
            new.gain.copy_(old.gain[safe])
            new.atom_ids.copy_(torch.where(real, old.atom_ids[safe], torch.full_like(safe, -1)))
        new.lam.requires_grad_(old.lam.requires_grad)
        new.W_s.requires_grad_(old.W_s.requires_grad)
        new.D.requires_grad_(old.D.requires_grad)
        layer.adapters[adapter] = new
        sizes[name] = len(index)
    return sizes


def kept_positions(keep: torch.Tensor, heads: int) -> torch.Tensor:
    """Positions of kept atoms, head by head, padded with -1 to the same count per head (atom ``j``
    belongs to head ``j // ceil(M/H)``, as in ``AtomAttention.channels``)."""
    keep = keep.cpu()
    spare = -len(keep) % heads
    per_head = torch.cat([keep, keep.new_zeros(spare)]).view(heads, -1)
    width = max(1, int(per_head.sum(1).max()))
    rows = []
    for h in range(heads):
        pos = per_head[h].nonzero().flatten() + h * per_head.shape[1]
        rows.append(torch.cat([pos, torch.full((width - len(pos),), -1, dtype=pos.dtype)]))
    return torch.cat(rows).to(keep.device)
