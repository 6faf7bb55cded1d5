"""Merge two adapters of one model into a third.

``sum`` is the paper's merge: add the fine-tuned parameters element-wise (same shapes required).
It works when the two adapters' important atoms rarely share an index, because atom m of one is
added to atom m of the other; ``atom_overlap`` measures exactly that. ``concat`` stacks the two
atom sets (our addition): for element-wise shrinkages its update is exactly the sum of both
adapters' updates. Thresholds λ are averaged by ``sum`` (adding two thresholds would double
sparsity); masks are united and gains averaged.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from .errors import AtomtuneError
from .layer import Atoms

if TYPE_CHECKING:
    from .model import AtomModel

MERGES = ("sum", "concat")


def merge_adapters(atom_model: AtomModel, first: str, second: str, name: str, how: str = "sum") -> None:
    """Add adapter ``name`` = ``first`` ⊕ ``second`` to ``atom_model`` and make it active."""
    if how not in MERGES:
        raise AtomtuneError(f"merge must be one of {', '.join(MERGES)}; got {how!r}")
    for adapter in (first, second):
        if adapter not in atom_model.configs:
            raise AtomtuneError(f"no adapter named {adapter!r}")
    ca, cb = atom_model.configs[first], atom_model.configs[second]
    for field in ("mode", "placement", "shrinkage", "topk"):
        if getattr(ca, field) != getattr(cb, field):
            raise AtomtuneError(
                f"cannot merge: {field} differs ({getattr(ca, field)!r} vs {getattr(cb, field)!r})"
            )
    if how == "concat" and ca.shrinkage == "topk":
        raise AtomtuneError("concat merge needs an element-wise shrinkage (soft or relu), not topk")
    a, b = atom_model.atoms(first), atom_model.atoms(second)
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))[0]
        raise AtomtuneError(f"cannot merge: module {diff} is adapted by one adapter only")
    layers = atom_model.layers()
    merged = {}
    for module, atoms_a in a.items():
        atoms_b, heads = b[module], layers[module].heads
        if how == "sum":
            if atoms_a.W_s.shape != atoms_b.W_s.shape or atoms_a.D.shape != atoms_b.D.shape:
                raise AtomtuneError(
                    f"sum merge needs equal shapes; {module}: {tuple(atoms_a.D.shape)} vs {tuple(atoms_b.D.shape)}"
                )
            merged[module] = _sum(atoms_a, atoms_b)
        else:
            merged[module] = _concat(atoms_a, atoms_b, heads, offset=ca.num_atoms)
    config = dataclasses.replace(ca, num_atoms=ca.num_atoms + cb.num_atoms) if how == "concat" else ca
    atom_model.add_adapter(name, config, num_atoms={m: len(t["lam"]) for m, t in merged.items()})
    with torch.no_grad():
        for module, atoms in atom_model.atoms(name).items():
            for key, value in merged[module].items():
                getattr(atoms, key).copy_(value)


def _sum(a: Atoms, b: Atoms) -> dict[str, torch.Tensor]:
    return {
        "W_s": a.W_s + b.W_s,
        "D": a.D + b.D,
        "lam": (a.lam.abs() + b.lam.abs()) / 2,
        "mask": torch.maximum(a.mask, b.mask),
        "gain": (a.gain + b.gain) / 2,
        "atom_ids": a.atom_ids,
    }


def _concat(a: Atoms, b: Atoms, heads: int, offset: int) -> dict[str, torch.Tensor]:
    """Stack head by head: head h's channels are a's group h followed by b's group h."""

    def per_head(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
        xs, ys = x.chunk(heads, dim=dim), y.chunk(heads, dim=dim)
        return torch.cat([t for pair in zip(xs, ys, strict=True) for t in pair], dim=dim)

    ids_b = torch.where(b.atom_ids >= 0, b.atom_ids + offset, b.atom_ids)
    return {
        "W_s": per_head(a.W_s, b.W_s, 1),
        "D": per_head(a.D, b.D, 0),
        "lam": per_head(a.lam, b.lam, 0),
        "mask": per_head(a.mask, b.mask, 0),
        "gain": per_head(a.gain, b.gain, 0),
        "atom_ids": per_head(a.atom_ids, ids_b, 0),
    }


def atom_overlap(
    importance_a: dict[str, torch.Tensor], importance_b: dict[str, torch.Tensor], k: int
) -> dict[str, dict[str, Any]]:
    """Per module: how many of the two adapters' top-``k`` atom indices coincide.

    ``overlap`` is ``|A∩B| / k`` (0: the sum merge adds no important atom onto another), ``jaccard``
    is ``|A∩B| / |A∪B|``; ``shared`` lists the common indices.
    """
    report = {}
    for module in importance_a.keys() & importance_b.keys():
        ka = min(k, len(importance_a[module]))
        top_a = set(importance_a[module].argsort(descending=True)[:ka].tolist())
        top_b = set(importance_b[module].argsort(descending=True)[:ka].tolist())
        shared = sorted(top_a & top_b)
        report[module] = {
            "overlap": len(shared) / max(ka, 1),
            "jaccard": len(shared) / max(len(top_a | top_b), 1),
            "shared": shared,
        }
    return dict(sorted(report.items()))
