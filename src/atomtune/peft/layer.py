"""PEFT's layer for atoms: the wrapped linear layer's output plus ``σ_λ(X·W_s)·D`` per active adapter.

PEFT holds the parameters by adapter name in ``atoms_dict``, a ``ModuleDict`` of core ``Atoms``
(``W_s``, ``D``, ``λ`` and the ``mask``, ``gain`` and ``atom_ids`` buffers), so a state-dict key
reads ``…to_q.atoms_dict.default.W_s`` as LoRA's reads ``…to_q.lora_A.default.weight``. The update
itself is computed by a core ``AtomLinear`` whose adapters are that same ``ModuleDict``: the
formula, the listeners that ``AtomStatistics`` uses and the sparsity a regularisation reads are
``AtomModel``'s own. That core layer stays off the module tree (its only tensors are
``atoms_dict``'s, which the tree holds) and follows PEFT's active adapter and disabling.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from atomtune.core.hosts.transformers import linear_shape
from atomtune.core.layer import AtomLinear
from atomtune.errors import AtomtuneError
from atomtune.peft.config import AtomsPeftConfig

MERGE_ERROR = (
    "atoms cannot be merged into the weights: σ_λ(X·W_s)·D shrinks each token's coefficients, so the "
    "update is no weight change; keep the adapter on, or unload() it"
)


class AtomsLayer(BaseTunerLayer):
    """The atom adapters of one linear layer (``nn.Linear`` or transformers' ``Conv1D``)."""

    adapter_layer_names = ("atoms_dict",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module) -> None:
        shape = linear_shape(base_layer)
        if shape is None:
            raise AtomtuneError(f"atoms adapt nn.Linear and Conv1D layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = shape
        self.atoms_dict = nn.ModuleDict()
        core = AtomLinear(self.in_features)
        core.adapters = self.atoms_dict
        object.__setattr__(self, "core", core)  # not a submodule: its tensors are atoms_dict's
        self.fixed_lambda: set[str] = set()  # adapters whose λ stays as initialised
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    def update_layer(self, adapter_name: str, config: AtomsPeftConfig, num_atoms: int) -> None:
        """Add adapter ``adapter_name`` with ``num_atoms`` atoms (``AtomModel``'s initialisation)."""
        like = self.get_base_layer().weight
        self.core.add_adapter(adapter_name, config.to_atom_config(), self.out_features, like, num_atoms)
        if config.learn_lambda:
            self.fixed_lambda.discard(adapter_name)
        else:
            self.fixed_lambda.add(adapter_name)
        self.set_adapter(self.active_adapters)

    # -- PEFT's adapter state, mirrored on the core layer --------------------------------------
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_fixed_lambda()
        self._follow()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._follow()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.fixed_lambda.discard(adapter_name)
        self._follow()

    def _freeze_non_trainable_peft_weights(self, adapter_names: Any = None) -> None:
        super()._freeze_non_trainable_peft_weights(adapter_names)
        self._freeze_fixed_lambda()

    def _freeze_fixed_lambda(self) -> None:
        for name in self.fixed_lambda & set(self.atoms_dict):
            self.atoms_dict[name].lam.requires_grad_(False)

    def _follow(self) -> None:
        """The core layer's active adapter (the first active one here) and its disabled flag."""
        names = [name for name in self.active_adapters if name in self.atoms_dict]
        self.core.active_adapter = names[0] if names else None
        self.core.disabled = self.disable_adapters

    # -- merging: not a weight change ---------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise AtomtuneError(MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged."""


class Linear(nn.Module, AtomsLayer):
    """An ``nn.Linear`` or ``Conv1D`` with atom adapters added to its output."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AtomsPeftConfig, num_atoms: int):
        super().__init__()
        AtomsLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_atoms)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:  # several active adapters: their updates add up
            if name in self.atoms_dict:
                result = result + self.core.delta(self.atoms_dict[name], x)
        return result

    def __repr__(self) -> str:
        return "atoms." + super().__repr__()
