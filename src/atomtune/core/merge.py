"""Merge two adapters of one model into a third.

``sum`` is the paper's merge: add the fine-tuned parameters element-wise, atom by atom id (a pruned
adapter counts as its full dictionary with the removed atoms at zero). It works when the two
adapters' important atoms rarely share an index, because atom m of one is added to atom m of the
other; ``atom_overlap`` measures exactly that. ``concat`` stacks the two
atom sets (our addition): for element-wise shrinkages its update is exactly the sum of both
adapters' updates. Thresholds λ are averaged by ``sum`` (adding two thresholds would double
sparsity); masks are united and gains averaged.

``first_only`` names modules where the merge keeps the first adapter alone, the per-module choice
that B-LoRA and K-LoRA make for LoRA: a style adapter's change to, say, self-attention's queries
(where each image token looks) can redraw the concept's shape. docs/merging.md measures it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from atomtune.core.layer import Atoms
from atomtune.core.selection import kept_positions
from atomtune.core.serialization import TENSORS
from atomtune.core.targets import check_parts, has_part
from atomtune.errors import AtomtuneError

if TYPE_CHECKING:
    from atomtune.core.model import AtomModel

MERGES = ("sum", "concat")


def merge_adapters(
    atom_model: AtomModel,
    first: str,
    second: str,
    name: str,
    how: str = "sum",
    first_only: Sequence[str] = (),
) -> None:
    """Add adapter ``name`` = ``first`` ⊕ ``second`` to ``atom_model`` and make it active.

    ``first_only``: modules, each named by a dotted part of its name (``attn1``, ``to_q``,
    ``attn1.to_q``, ``transformer_blocks.3``), where ``name`` is ``first`` alone; each must match
    an adapted module."""
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
    first_only = list(first_only)
    check_parts(a, first_only)
    layers = atom_model.layers()
    merged = {}
    for module, atoms_a in a.items():
        atoms_b, heads = b[module], layers[module].heads
        if first_only and has_part(module, first_only):
            merged[module] = {key: getattr(atoms_a, key).detach().clone() for key in TENSORS}
        elif how == "sum":
            if ca.num_atoms != cb.num_atoms or atoms_a.D.shape[1] != atoms_b.D.shape[1]:
                raise AtomtuneError(
                    f"sum merge needs dictionaries of one size; {module}: {ca.num_atoms} atoms of "
                    f"{atoms_a.D.shape[1]} vs {cb.num_atoms} of {atoms_b.D.shape[1]}"
                )
            merged[module] = _sum(atoms_a, atoms_b, heads, ca.num_atoms)
        else:
            if atoms_a.num_atoms % heads or atoms_b.num_atoms % heads:
                raise AtomtuneError(
                    f"concat merge needs atoms split evenly over the {heads} heads of {module}"
                )
            merged[module] = _concat(atoms_a, atoms_b, heads, offset=ca.num_atoms)
    config = dataclasses.replace(ca, num_atoms=ca.num_atoms + cb.num_atoms) if how == "concat" else ca
    atom_model.add_adapter(name, config, num_atoms={m: len(t["lam"]) for m, t in merged.items()})
    with torch.no_grad():
        for module, atoms in atom_model.atoms(name).items():
            for key, value in merged[module].items():
                getattr(atoms, key).copy_(value)


def _sum(a: Atoms, b: Atoms, heads: int, num_atoms: int) -> dict[str, torch.Tensor]:
    """Atom ``m`` of one plus atom ``m`` of the other, by atom id.

    A pruned adapter is the full dictionary with its removed atoms at zero, so both are laid out
    over all ``num_atoms`` ids first: an atom only one adapter kept passes unchanged, atoms both
    kept are added (λ and gain averaged), and only ids kept by either survive. Unpruned adapters
    of one size are simply added element-wise.
    """
    full_a, full_b = _full(a, num_atoms), _full(b, num_atoms)
    in_a, in_b = full_a.pop("real"), full_b.pop("real")
    both = (in_a & in_b).to(a.lam.dtype)
    one = 1 - both / 2  # 1 where only one adapter has the atom, 1/2 where both have it

    def mean(key: str) -> torch.Tensor:
        return (full_a[key] * in_a + full_b[key] * in_b) * one

    out = {
        "W_s": full_a["W_s"] + full_b["W_s"],
        "D": full_a["D"] + full_b["D"],
        "lam": mean("lam"),
        "mask": torch.maximum(full_a["mask"], full_b["mask"]),
        "gain": mean("gain"),
        "atom_ids": torch.arange(num_atoms, device=a.atom_ids.device),
    }
    index = kept_positions(in_a | in_b, heads)
    real, safe = index >= 0, index.clamp(min=0)
    gathered = {key: value[..., safe] if key == "W_s" else value[safe] for key, value in out.items()}
    return _inert_pads(gathered, real)


def _full(atoms: Atoms, num_atoms: int) -> dict[str, torch.Tensor]:
    """An adapter's tensors over the whole dictionary (row ``m`` = atom id ``m``; absent atoms zero)."""
    real = atoms.atom_ids >= 0
    ids = atoms.atom_ids[real]
    if len(ids) and int(ids.max()) >= num_atoms:
        raise AtomtuneError(f"atom id {int(ids.max())} is beyond the dictionary's {num_atoms} atoms")
    present = torch.zeros(num_atoms, dtype=torch.bool, device=ids.device)
    present[ids] = True
    out = {"real": present}
    for key in ("W_s", "D", "lam", "mask", "gain"):
        value = getattr(atoms, key).detach()
        if key == "lam":
            value = value.abs()
        if key == "W_s":
            full = value.new_zeros(value.shape[0], num_atoms)
            full[:, ids] = value[:, real]
        else:
            full = value.new_zeros((num_atoms, *value.shape[1:]))
            full[ids] = value[real]
        out[key] = full
    return out


def _inert_pads(tensors: dict[str, torch.Tensor], real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Padding atoms (to give every head the same width) do nothing: zero weights, masked, id -1."""
    r = real.to(tensors["D"].dtype)
    return {
        "W_s": tensors["W_s"] * r,
        "D": tensors["D"] * r[:, None],
        "lam": tensors["lam"],
        "mask": tensors["mask"] * r,
        "gain": tensors["gain"],
        "atom_ids": torch.where(real, tensors["atom_ids"], torch.full_like(tensors["atom_ids"], -1)),
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
    importance_a: dict[str, torch.Tensor],
    importance_b: dict[str, torch.Tensor],
    k: int,
    ids_a: dict[str, torch.Tensor] | None = None,
    ids_b: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per module: how many of the two adapters' top-``k`` atom ids coincide.

    ``overlap`` is ``|A∩B| / k`` (0: the sum merge adds no important atom onto another), ``jaccard``
    is ``|A∩B| / |A∪B|``; ``shared`` lists the common ids. Without ``ids_*`` an atom's id is its
    position (an unpruned adapter); with them, pruned adapters compare by id and pads never count.
    """

    def top(importance: torch.Tensor, ids: torch.Tensor | None, count: int) -> set[int]:
        ids = torch.arange(len(importance)) if ids is None else ids.cpu()
        ranked = ids[importance.argsort(descending=True).cpu()]
        return set(ranked[ranked >= 0][:count].tolist())

    report = {}
    for module in importance_a.keys() & importance_b.keys():
        ka = min(k, len(importance_a[module]))
        top_a = top(importance_a[module], (ids_a or {}).get(module), ka)
        top_b = top(importance_b[module], (ids_b or {}).get(module), ka)
        shared = sorted(top_a & top_b)
        report[module] = {
            "overlap": len(shared) / max(ka, 1),
            "jaccard": len(shared) / max(len(top_a | top_b), 1),
            "shared": shared,
        }
    return dict(sorted(report.items()))
