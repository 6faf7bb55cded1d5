"""``AtomsModel``: PEFT's tuner for atoms, found by ``get_peft_model`` and ``add_adapter``.

PEFT's ``BaseTuner`` finds the modules a config selects, keeps several named adapters, switches,
disables, deletes and unloads them; this class says only how a selected module gets its atoms, that
atoms do not merge into weights, and that a saved adapter must fit the model it loads into.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from atomtune.core.hosts.transformers import linear_shape
from atomtune.errors import AtomtuneError
from atomtune.peft.config import AtomsPeftConfig
from atomtune.peft.layer import MERGE_ERROR, AtomsLayer, Linear


class AtomsModel(BaseTuner):
    """Atom adapters (``AtomsPeftConfig``) on a model's linear layers.

    Example::

        import atomtune.peft  # registers the method with PEFT
        from peft import get_peft_model

        model = get_peft_model(transformer, AtomsPeftConfig(num_atoms=64, target_modules=["to_q", "to_v"]))
    """

    prefix: str = "atoms_"
    tuner_layer_cls = AtomsLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 - PEFT's class attribute

    def _prepare_adapter_config(self, peft_config: AtomsPeftConfig, model_config: dict) -> AtomsPeftConfig:
        return peft_config  # target_modules is required: there are no per-architecture defaults

    def _create_and_replace(
        self,
        peft_config: AtomsPeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        num_atoms = peft_config.atoms_pattern.get(current_key, peft_config.num_atoms)
        if isinstance(target, AtomsLayer):
            target.update_layer(adapter_name, peft_config, num_atoms)
            return
        if isinstance(target, BaseTunerLayer):
            raise AtomtuneError(f"{current_key} already holds another PEFT method's adapter")
        if linear_shape(target) is None:
            raise AtomtuneError(
                f"{current_key} is a {type(target).__name__}: atoms adapt nn.Linear and Conv1D layers "
                f"(target its projections)"
            )
        new_module = Linear(target, adapter_name, peft_config, num_atoms)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise AtomtuneError(MERGE_ERROR)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: AtomsPeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key mapping, then one line for the first tensor that does not fit the model (where
        ``load_state_dict(strict=False)`` would skip it, or list every size mismatch)."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        for key, value in remapped.items():
            if key not in own:
                if ".atoms_dict." in key:
                    raise AtomtuneError(
                        f"adapter tensor {key} has no place in the model: it was saved from another model"
                    )
            elif own[key].shape != value.shape:
                raise AtomtuneError(
                    f"adapter tensor {key} has shape {tuple(value.shape)} where the model's has "
                    f"{tuple(own[key].shape)}: the adapter was saved from another model"
                )
        ours = f".atoms_dict.{adapter_name}."
        missing = sorted(k for k in own if ours in k and k not in remapped)
        if missing:
            raise AtomtuneError(f"the adapter lacks tensor {missing[0]} ({len(missing)} missing)")
        return remapped
