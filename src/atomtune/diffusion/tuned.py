"""``Tuned``: a transformer with one method's adapter injected, the trainer's and the pipeline's only view
of it; ``AtomTuned`` for atoms (PEFT's methods are in ``peft_tuned``).

An adapter folder holds the method's own files and ``atomtune.json`` (``SIDECAR``): the method, the base
model's name and class, and the shapes of the adapted projections (``base_record``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atomtune.core.budget import AtomBudgetRun
from atomtune.core.model import AtomModel
from atomtune.core.serialization import model_identity
from atomtune.diffusion.spec import PixArtSpec
from atomtune.errors import AtomtuneError
from atomtune.io import save_json
from atomtune.version import __version__

SIDECAR = "atomtune.json"
TARGET_MODULES = PixArtSpec.target_modules


def projection_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``[in, out]`` of every adapted projection: the fingerprint an adapter must match."""
    shapes = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in TARGET_MODULES):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear):
            shapes[name] = [base.in_features, base.out_features]
    return shapes


def base_record(model: nn.Module, pretrained: str | None) -> dict[str, Any]:
    identity = model_identity(model)
    return {"pretrained": pretrained, "class": identity["class"], "projections": projection_shapes(model)}


# -- the tuned transformer ----------------------------------------------------------------------
class Tuned:
    """A transformer with one method's adapter(s) injected in place; the trainer's only view of it."""

    method: str
    target_modules: tuple[str, ...] | None = None  # the host's LoRA targets, if not PixArt's

    def __init__(self, model: nn.Module, pretrained: str | None) -> None:
        self.model = model
        self.pretrained = pretrained

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def regularization(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The method's extra loss for the last forward and its terms (atoms only); call once per forward."""
        return None, {}

    # -- hooks of the training loop (atoms: the budget's cuts; the baselines have none) ------------
    def start_training(self, total_steps: int, seed: int) -> None:
        """Called once before the first step."""

    def after_step(self, step: int) -> float | None:
        """Called after each optimizer step; a number asks the loop to set lr = base lr x number."""
        return None

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the trainable parameters that a checkpoint must keep for an exact resume."""
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``training_state`` returned; refuse tensors this run does not have."""
        if tensors:
            raise AtomtuneError(f"holds tensors this adapter does not have ({sorted(tensors)[0]})")

    def finish_training(self) -> None:
        """Called once after the last step, before the adapter is saved."""

    def live_atoms(self) -> dict[str, int]:
        """Atoms per module that can act (atoms only; pads and cut atoms do not count)."""
        return {}

    @contextmanager
    def disable(self) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """Remove the adapter(s): the model is the pretrained one again."""
        raise NotImplementedError

    def _write_sidecar(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        record = {
            "atomtune_version": __version__,
            "method": self.method,
            "base_model": base_record(self.model, self.pretrained),
            **(extra or {}),
        }
        save_json(record, directory / SIDECAR)


class AtomTuned(Tuned):
    method = "atoms"

    def __init__(self, handle: AtomModel, pretrained: str | None) -> None:
        super().__init__(handle.model, pretrained)
        self.handle = handle
        self._budget: AtomBudgetRun | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.handle.trainable_parameters()

    def regularization(self) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.handle.regularization_terms()
        loss = self.handle.weigh(terms)
        return loss, {**{k: float(v.detach()) for k, v in terms.items()}, **self.handle.activity()}

    def live_atoms(self) -> dict[str, int]:
        return {name: int((a.mask != 0).sum()) for name, a in self.handle.atoms().items()}

    def start_training(self, total_steps: int, seed: int) -> None:
        self._budget = AtomBudgetRun.start(self.handle, total_steps, seed)

    def after_step(self, step: int) -> float | None:
        return None if self._budget is None else self._budget.after_step(step)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {} if self._budget is None else self._budget.state()

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._budget is None:
            super().load_training_state(tensors)
        else:
            self._budget.load_state(tensors)

    def finish_training(self) -> None:
        if self._budget is not None:
            self._budget.finish()
            self._budget = None

    @contextmanager
    def disable(self) -> Iterator[None]:
        with self.handle.disable():
            yield

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        self.handle.save(directory)
        self._write_sidecar(directory, extra)
        return directory

    def unload(self) -> nn.Module:
        return self.handle.unload()
