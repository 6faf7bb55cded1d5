"""What the VAE experiment measures of each fine-tune: P(new digit), sparsity, and what its top components do.

Atoms and LoRA are measured by the same functions on the same inputs (the new digit's training images
encoded, the same prior samples decoded), so their numbers can stand side by side in one table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from atomtune.core.model import AtomModel
from atomtune.core.selection import share_masks
from atomtune.core.stats import AtomStatistics
from atomtune.experiments.vae.judge import DigitJudge, judge_images
from atomtune.experiments.vae.lora_components import LoraStatistics, lora_component_removed
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.settings import VaeSettings


def observe_generation(
    vae: TransformerVAE, statistics: AbstractContextManager, new_images: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """Encode ``new_images`` and decode ``z`` inside ``statistics``; return the decoded images.

    The inputs a method's contributions are gathered over, one definition for atoms and LoRA alike.
    """
    vae.eval()
    with torch.no_grad(), statistics:
        vae.encode(new_images)
        return vae.generate(z)


def count_for_share(contribution: dict[str, torch.Tensor], share: float) -> dict[str, int]:
    """Per module, the fewest components whose contribution reaches ``share`` of the module's total."""
    return {name: int(m.sum()) for name, m in share_masks(contribution, share, per_module=True).items()}


@torch.no_grad()
def removal_effects(
    decode: Callable[[], torch.Tensor],
    full: torch.Tensor,
    judge: DigitJudge,
    s: VaeSettings,
    removals: list[tuple[str, Callable[[], Any]]],
) -> list[dict[str, Any]]:
    """For each (label, context manager factory): P(new) and mean |Δpixel| of ``decode()`` inside it."""
    out = []
    for label, removed in removals:
        with removed():
            images = decode()
        out.append(
            {
                "removed": label,
                **judge_images(judge, images, s),
                "pixel_change": (images - full).abs().mean().item(),
            }
        )
    return out


@contextmanager
def atoms_masked(atoms: AtomModel, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Apply ``masks`` to ``atoms`` for the duration of the block, then clear every mask."""
    atoms.set_masks(masks)
    try:
        yield
    finally:
        atoms.reset_steering()


def atom_removed(atoms: AtomModel, name: str, position: int) -> AbstractContextManager[None]:
    """Switch off the atom at ``position`` of module ``name`` (mask 0) for the duration of the block."""
    mask = torch.ones(atoms.atoms()[name].num_atoms)
    mask[position] = 0
    return atoms_masked(atoms, {name: mask})


def measure_atoms(
    vae: TransformerVAE,
    atoms: AtomModel,
    new_images: torch.Tensor,
    z: torch.Tensor,
    judge: DigitJudge,
    s: VaeSettings,
) -> dict[str, Any]:
    """Sparsity, the atoms carrying ``s.share`` per layer, and what removing the top decoder atoms does."""
    stats = AtomStatistics(atoms)
    full = observe_generation(vae, stats, new_images, z)
    contribution = stats.contribution()
    all_atoms = atoms.atoms()
    # Over live atoms: a pruned adapter keeps as many slots per head, the spare ones masked.
    live = {n: all_atoms[n].mask.detach().cpu() != 0 for n in stats.tokens}
    nonzero = sum(float(stats.nonzero[n].cpu()[live[n]].sum()) for n in stats.tokens)
    total = sum(stats.tokens[n] * int(live[n].sum()) for n in stats.tokens)
    counts = count_for_share(contribution, s.share)
    report = stats.report()
    removals = []
    for name in contribution:
        if not name.startswith("decoder"):
            continue
        for position in contribution[name].argsort(descending=True)[: s.top_removed].tolist():
            atom_id = int(all_atoms[name].atom_ids[position])
            removals.append(
                (f"{name} atom {atom_id}", lambda name=name, p=position: atom_removed(atoms, name, p))
            )
    keep = share_masks(contribution, s.share, per_module=True)
    removals.append((f"all but the {s.share:.0%} atoms", lambda: atoms_masked(atoms, keep)))
    effects = removal_effects(lambda: vae.generate(z), full, judge, s, removals)
    return {
        **judge_images(judge, full, s),
        "trainable_parameters": atoms.num_trainable_parameters(),
        "zero_coefficient_share": 1 - nonzero / max(total, 1),
        "active_atoms_per_token": {n: float(stats.frequency()[n].sum()) for n in stats.tokens},
        "components_per_layer": {n: int(live[n].sum()) for n in contribution},
        "components_for_share": counts,
        "contribution": {n: report[n]["contribution"] for n in report},
        "component_ids": {n: report[n]["atom_ids"] for n in report},
        "removal": effects,
        "_full": full,
    }


def measure_lora(
    vae: TransformerVAE, new_images: torch.Tensor, z: torch.Tensor, judge: DigitJudge, s: VaeSettings
) -> dict[str, Any]:
    """The same measures for LoRA, its rank-one components in place of atoms."""
    stats = LoraStatistics(vae, per_projection=s.form == "projections")
    full = observe_generation(vae, stats, new_images, z)
    contribution = stats.contribution()
    counts = count_for_share(contribution, s.share)
    removals = []
    ranked: dict[str, list[str]] = {}
    values: dict[str, list[float]] = {}
    for name, c in contribution.items():
        order = c.argsort(descending=True)
        names = stats.component_names(name)
        ranked[name] = [names[i] for i in order.tolist()]
        values[name] = c[order].tolist()
        if name.startswith("decoder"):
            for i in order[: s.top_removed].tolist():
                removals.append(
                    (f"{name} LoRA {names[i]}", lambda name=name, i=i: lora_component_removed(vae, name, i))
                )
    effects = removal_effects(lambda: vae.generate(z), full, judge, s, removals)
    return {
        **judge_images(judge, full, s),
        "trainable_parameters": sum(p.numel() for p in vae.parameters() if p.requires_grad),
        "components_per_layer": {n: len(c) for n, c in contribution.items()},
        "components_for_share": counts,
        "contribution": values,
        "component_ids": ranked,
        "removal": effects,
        "_full": full,
    }
