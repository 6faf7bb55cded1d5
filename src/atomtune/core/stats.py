"""Streaming atom statistics: which atoms matter, measured over any number of forward passes.

For atom m of a module, contribution is ``E[|s_m|]·‖d_m‖`` (how much of the update it carries) and
frequency is ``P(s_m ≠ 0)``; expectations run over tokens, batch items, timesteps and prompts,
whatever forward passes happen inside the ``with`` block. Memory is two float64 vectors per
module, however long it runs. Coefficients are read before masks and gains, and ``‖d_m‖`` is the
trained atom's norm, so calibration does not depend on the steering in force.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atomtune.core.layer import AtomLayer

if TYPE_CHECKING:
    from atomtune.core.model import AtomModel


class AtomStatistics:
    """Collect per-module, per-atom ``E|s|`` and ``P(s≠0)`` of the active adapter while in a ``with``."""

    def __init__(self, atom_model: AtomModel) -> None:
        self.atom_model = atom_model
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.nonzero: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._names = {id(layer): name for name, layer in atom_model.layers().items()}

    def __enter__(self) -> AtomStatistics:
        for layer in self.atom_model.layers().values():
            layer.listeners.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.atom_model.layers().values():
            if self._observe in layer.listeners:
                layer.listeners.remove(self._observe)

    def reset(self) -> None:
        """Forget what was seen (a budget's cut starts a new window)."""
        self.abs_sum, self.nonzero, self.tokens = {}, {}, {}

    def _observe(self, layer: AtomLayer, s: torch.Tensor) -> None:
        # accumulated where ``s`` lives (no device sync per forward); read out on the CPU
        name = self._names[id(layer)]
        flat = s.reshape(-1, s.shape[-1])
        dtype = torch.float32 if flat.device.type == "mps" else torch.float64
        abs_sum = flat.abs().sum(0, dtype=dtype)
        nonzero = (flat != 0).sum(0).to(dtype)
        if name in self.abs_sum and self.abs_sum[name].shape == abs_sum.shape:
            self.abs_sum[name] += abs_sum
            self.nonzero[name] += nonzero
            self.tokens[name] += flat.shape[0]
        else:
            self.abs_sum[name], self.nonzero[name], self.tokens[name] = abs_sum, nonzero, flat.shape[0]

    def mean_abs(self) -> dict[str, torch.Tensor]:
        return {n: v.double().cpu() / self.tokens[n] for n, v in self.abs_sum.items()}

    def frequency(self) -> dict[str, torch.Tensor]:
        """``P(s_m ≠ 0)`` per module."""
        return {n: v.double().cpu() / self.tokens[n] for n, v in self.nonzero.items()}

    def contribution(self) -> dict[str, torch.Tensor]:
        """``E|s_m|·‖d_m‖`` per module: the importance that selection ranks by."""
        atoms = self.atom_model.atoms()
        return {n: v * atoms[n].D.detach().norm(dim=1).double().cpu() for n, v in self.mean_abs().items()}

    def report(self) -> dict[str, Any]:
        """Per module: atoms ranked by contribution, with their ids, contribution and frequency."""
        atoms = self.atom_model.atoms()
        freq = self.frequency()
        out = {}
        for name, contrib in self.contribution().items():
            order = contrib.argsort(descending=True)
            ids = atoms[name].atom_ids.cpu()[order]
            out[name] = {
                "tokens": self.tokens[name],
                "atom_ids": ids.tolist(),
                "contribution": contrib[order].tolist(),
                "frequency": freq[name][order].tolist(),
            }
        return out

    def sparsity(self, share: float = 0.9) -> dict[str, Any]:
        """True sparsity, over live atoms (mask ≠ 0; pruning pads and budget cuts are not atoms):

        - ``zero_share``: the share of zero coefficients;
        - ``active_per_token``: live atoms with a non-zero coefficient per token (``Σ_m P(s_m≠0)``);
        - ``atoms_for_share``: the fewest atoms carrying ``share`` of the module's contribution.

        Per module, and the mean over modules (``mean``).
        """
        from atomtune.core.selection import share_masks

        atoms = self.atom_model.atoms()
        contribution, freq = self.contribution(), self.frequency()
        modules = {}
        for name, contrib in contribution.items():
            live = (atoms[name].mask != 0).cpu()
            n_live = int(live.sum())
            active = float(freq[name][live].sum())
            carrying = int(share_masks({name: contrib * live}, share)[name].sum())
            modules[name] = {
                "live_atoms": n_live,
                "zero_share": 1.0 - active / max(n_live, 1),
                "active_per_token": active,
                "atoms_for_share": carrying,
            }
        keys = ("live_atoms", "zero_share", "active_per_token", "atoms_for_share")
        mean = {k: sum(m[k] for m in modules.values()) / max(len(modules), 1) for k in keys}
        return {"share": share, "mean": mean, "modules": modules}

    def save_json(self, path: str | Path) -> None:
        from atomtune.io import atomic_write

        text = json.dumps(self.report(), indent=1) + "\n"
        atomic_write(Path(path), lambda p: p.write_text(text))


def weight_importance(atom_model: AtomModel, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """A data-free proxy of contribution: ``‖w_s,m‖·‖d_m‖`` (coefficient gain times atom norm).

    Use it when no calibration prompts are at hand; ``AtomStatistics.contribution`` measures the
    real thing.
    """
    return {
        name: (atoms.W_s.detach().norm(dim=0) * atoms.D.detach().norm(dim=1)).double().cpu()
        for name, atoms in atom_model.atoms(adapter).items()
    }
