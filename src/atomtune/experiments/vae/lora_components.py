"""LoRA read as components: each rank-one ``b_i·a_iᵀ`` of each projection, the analogue of an atom.

The core reads atoms with ``AtomStatistics`` and masks; LoRA has neither, so this module gives it the
same two tools (a contribution per component, and switching one off) to compare the two fairly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from atomtune.errors import AtomtuneError
from atomtune.experiments.vae.model import TransformerVAE


def lora_components(
    vae: TransformerVAE, per_projection: bool = False
) -> dict[str, list[tuple[str, nn.Module]]]:
    """Per attention module (or, ``per_projection``, per projection: the grouping of atoms on the
    projections), its LoRA-wrapped projections ``[(projection name, lora layer), ...]``."""
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in vae.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            attn, _, proj = name.partition(".attn.")
            out.setdefault(name if per_projection else f"{attn}.attn", []).append((proj, module))
    return out


class LoraStatistics:
    """``E|a_i·x|`` of each LoRA component while in a ``with`` block (the analogue of ``AtomStatistics``),
    grouped per attention module or ``per_projection`` as the atoms it stands beside are."""

    def __init__(self, vae: TransformerVAE, per_projection: bool = False) -> None:
        self.components = lora_components(vae, per_projection)
        self.abs_sum: dict[tuple[str, str], torch.Tensor] = {}
        self.count: dict[tuple[str, str], int] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> LoraStatistics:
        for attn, projections in self.components.items():
            for proj, layer in projections:
                self._hooks.append(
                    layer.lora_A["default"].register_forward_hook(self._observer((attn, proj)))
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _observer(self, key: tuple[str, str]) -> Callable[..., None]:
        def observe(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            flat = out.detach().reshape(-1, out.shape[-1]).double()
            self.abs_sum[key] = self.abs_sum.get(key, 0) + flat.abs().sum(0)
            self.count[key] = self.count.get(key, 0) + flat.shape[0]

        return observe

    def contribution(self) -> dict[str, torch.Tensor]:
        """Per group, (projections·rank,) contributions ``E|a_i·x|·‖b_i‖·scale``, projections in order."""
        out = {}
        for attn, projections in self.components.items():
            parts = []
            for proj, layer in projections:
                b_norm = layer.lora_B["default"].weight.detach().norm(dim=0).double()
                scale = float(layer.scaling["default"])
                parts.append(self.abs_sum[(attn, proj)] / self.count[(attn, proj)] * b_norm * scale)
            out[attn] = torch.cat(parts)
        return out

    def component_names(self, attn: str) -> list[str]:
        """``to_v/3``: projection and rank index of each entry of ``contribution()[attn]``."""
        return [
            f"{proj}/{i}"
            for proj, layer in self.components[attn]
            for i in range(layer.lora_B["default"].weight.shape[1])
        ]


@contextmanager
def lora_component_removed(vae: TransformerVAE, attn: str, index: int) -> Iterator[None]:
    """Zero one LoRA component (column of ``B``) of ``attn`` (an attention module or one of its
    projections) for the duration of the block."""
    offset = index
    groups = {**lora_components(vae), **lora_components(vae, per_projection=True)}
    if attn not in groups:
        raise AtomtuneError(f"{attn} has no LoRA components")
    for _proj, layer in groups[attn]:
        weight = layer.lora_B["default"].weight
        if offset < weight.shape[1]:
            saved = weight.data[:, offset].clone()
            weight.data[:, offset] = 0
            try:
                yield
            finally:
                weight.data[:, offset] = saved
            return
        offset -= weight.shape[1]
    raise AtomtuneError(f"{attn} has no LoRA component {index}")
