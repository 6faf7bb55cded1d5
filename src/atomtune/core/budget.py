"""An atom budget: train a full dictionary, keep the atoms that carry the change, train those on.

Why not a penalty alone: under an adaptive optimiser (CAME, Adam) every parameter moves by about
``lr`` per step whatever the size of its gradient, so every row of ``D`` grows at the same rate and
an L1 term on the coefficients cannot single out a few atoms in a short run (measured on the digit
testbed: 90% of each module's contribution needed 78% of its atoms). Removing atoms does: the
schedule below keeps, at a few points of training, the atoms of largest contribution ``E|s|·‖d‖``
measured on the training batches since the last cut, down to ``atom_budget`` per module; the
survivors train on alone, at a learning rate raised by ``(M / kept)^lr_exponent`` because a
step-bounded optimiser's total update grows with atoms x lr x steps. At the end the adapter is
pruned to its real size.

Atoms removed during training are masked (``Atoms.mask``), not deleted, so the optimiser's state and
the checkpoints keep one shape; ``AtomModel.prune`` deletes them once training ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atomtune.core.config import AtomConfig

if TYPE_CHECKING:
    from atomtune.core.model import AtomModel


def budget_schedule(config: AtomConfig, total_steps: int) -> list[tuple[int, int]]:
    """``[(step, atoms kept per module), …]``: the cuts, geometric from ``num_atoms`` to the budget.

    The cut at ``prune_at[i]`` of training keeps ``M·(budget/M)^((i+1)/n)`` atoms (rounded, at least
    the budget), so the last cut reaches the budget exactly. Empty without a budget.
    """
    if config.atom_budget is None or config.atom_budget >= config.num_atoms:
        return []
    m, b, n = config.num_atoms, config.atom_budget, len(config.prune_at)
    cuts = []
    for i, fraction in enumerate(config.prune_at):
        keep = max(b, round(m * (b / m) ** ((i + 1) / n)))
        step = max(1, min(total_steps, round(fraction * total_steps)))
        cuts.append((step, keep))
    return cuts


def kept_at(schedule: list[tuple[int, int]], step: int, num_atoms: int) -> int:
    """Atoms per module in force after ``step`` steps (cuts happen after their step's update)."""
    kept = num_atoms
    for cut_step, keep in schedule:
        if step >= cut_step:
            kept = keep
    return kept


def lr_factor(config: AtomConfig, kept: int) -> float:
    """How much the learning rate is raised when ``kept`` of ``num_atoms`` atoms remain."""
    return (config.num_atoms / max(kept, 1)) ** config.lr_exponent


def cut(
    atom_model: AtomModel,
    importance: dict[str, torch.Tensor],
    keep: int,
    by: str = "contribution",
    generator: torch.Generator | None = None,
) -> dict[str, int]:
    """Mask all but ``keep`` live atoms per module of the active adapter; returns live atoms per module.

    ``by="contribution"`` keeps the largest ``importance`` among atoms not yet masked;
    ``by="random"`` keeps a random set of the live atoms (the control that shows the ranking matters).
    """
    live_after = {}
    for name, atoms in atom_model.atoms().items():
        live = atoms.mask != 0
        score = importance[name].to(atoms.mask.device, torch.float64).clone()
        if by == "random":
            score = torch.rand(len(score), generator=generator, dtype=torch.float64).to(score.device)
        score[~live] = -float("inf")
        order = score.argsort(descending=True)
        chosen = order[: min(keep, int(live.sum()))]
        mask = torch.zeros_like(atoms.mask)
        mask[chosen] = 1.0
        atoms.mask.copy_(mask * atoms.mask)
        live_after[name] = int((atoms.mask != 0).sum())
    return live_after


class AtomBudgetRun:
    """The budget of one training run: watches contributions between cuts, cuts, prunes at the end.

    ``start`` returns ``None`` when the adapter has no budget, so the loop pays nothing then.
    """

    STATE = "budget"  # prefix of the tensors it adds to a training checkpoint

    def __init__(self, atom_model: AtomModel, schedule: list[tuple[int, int]], seed: int) -> None:
        from atomtune.core.stats import AtomStatistics

        self.atom_model = atom_model
        self.config = atom_model.configs[atom_model.active_adapter]
        self.schedule = schedule
        self.seed = seed
        self.window = AtomStatistics(atom_model).__enter__()

    @classmethod
    def start(cls, atom_model: AtomModel, total_steps: int, seed: int) -> AtomBudgetRun | None:
        schedule = budget_schedule(atom_model.configs[atom_model.active_adapter], total_steps)
        return cls(atom_model, schedule, seed) if schedule else None

    def after_step(self, step: int) -> float | None:
        """Apply the cuts due at ``step``; the learning-rate factor now in force, or None if none."""
        due = [(i, keep) for i, (cut_step, keep) in enumerate(self.schedule) if cut_step == step]
        if not due:  # (several cuts fall on one step when training is shorter than the schedule)
            return None
        contribution = self.window.contribution()
        for i, keep in due:
            generator = torch.Generator().manual_seed(self.seed * 1_000 + i)
            cut(self.atom_model, contribution, keep, self.config.prune_by, generator)
        self.window.reset()
        return lr_factor(self.config, due[-1][1])

    def state(self) -> dict[str, torch.Tensor]:
        """Masks and the open window's sums, so a resumed run cuts the same atoms."""
        out = {}
        for name, atoms in self.atom_model.atoms().items():
            out[f"{self.STATE}.mask.{name}"] = atoms.mask.detach().cpu().clone()
            if name in self.window.abs_sum:
                out[f"{self.STATE}.abs_sum.{name}"] = self.window.abs_sum[name].cpu().clone()
                out[f"{self.STATE}.nonzero.{name}"] = self.window.nonzero[name].cpu().clone()
                out[f"{self.STATE}.tokens.{name}"] = torch.tensor([self.window.tokens[name]])
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from atomtune.errors import AtomtuneError

        unknown = sorted(k for k in tensors if not k.startswith(self.STATE + "."))
        if unknown:
            raise AtomtuneError(f"holds tensors this adapter does not have ({unknown[0]})")
        self.window.reset()
        for name, atoms in self.atom_model.atoms().items():
            mask = tensors.get(f"{self.STATE}.mask.{name}")
            if mask is None or mask.shape != atoms.mask.shape:
                raise AtomtuneError(f"no atom-budget mask of {tuple(atoms.mask.shape)} for {name}")
            atoms.mask.copy_(mask)
            if f"{self.STATE}.tokens.{name}" in tensors:
                device = atoms.mask.device
                self.window.abs_sum[name] = tensors[f"{self.STATE}.abs_sum.{name}"].to(device)
                self.window.nonzero[name] = tensors[f"{self.STATE}.nonzero.{name}"].to(device)
                self.window.tokens[name] = int(tensors[f"{self.STATE}.tokens.{name}"][0])

    def finish(self) -> None:
        """Stop watching and prune the adapter to the atoms it kept: it saves at its real size."""
        self.window.__exit__(None, None, None)
        self.atom_model.prune()
