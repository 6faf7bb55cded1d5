"""The host measured: a preset's transformer with random weights, its inputs, and the parameter
yardstick (LoRA r=16's count on the host's LoRA targets, and the atom count that comes nearest it).

Random weights suffice: a step costs the same whatever the weights' values. Each host's class,
config, inputs and LoRA targets are its entry in ``hosts.HOSTS``; every transformer is built by
``tiny.from_config`` (as ``tiny.pixart_from_config`` builds PixArt's, so a seed means the same
weights everywhere), initialised in place on the device. Both counts come from
``core.parity``, read from shapes alone: a model built on the ``meta`` device answers for a
full-size host without its weights.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from atomtune.core.parity import lora_parameters, parameters_per_atom
from atomtune.speed.adapt import method_config
from atomtune.speed.hosts import HOSTS, Host
from atomtune.speed.settings import PRESETS, check_atom_count, host_of
from atomtune.tiny import from_config

LORA_RANK = 16  # the yardstick of "vs LoRA r16 params" and of atoms at "parity"
STATES = ("hidden_states", "encoder_hidden_states", "pooled_projections")  # in the host's dtype


def host(preset: str) -> Host:
    return HOSTS[host_of(preset)]


def build_transformer(preset: str, device: str, dtype: torch.dtype, sample: int | None = None) -> nn.Module:
    """The preset's transformer with random weights (seed 0), initialised in place on ``device``
    (``"meta"``: shapes only); ``sample`` (latent side) overrides the preset's."""
    from atomtune.progress import show_notices_once

    show_notices_once(("diffusers",))  # a notice per model built would repeat once per method
    p, h = PRESETS[preset], host(preset)
    config = h.config(p, sample or p["sample"])
    return cast_host(from_config(h.diffusers_class(), config, seed=0, device=device), dtype)


def cast_host(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model as ``from_pretrained(torch_dtype=dtype)`` leaves it: everything in ``dtype`` except
    the class's ``_keep_in_fp32_modules``. (diffusers' own ``.to(dtype)`` warns that such modules
    exist even for models that have none, PixArt among them.)"""
    nn.Module.to(model, dtype=dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name for k in keep):
            nn.Module.to(module, dtype=torch.float32)
    return model


def make_inputs(
    preset: str, batch: int, device: str, dtype: torch.dtype, sample: int | None = None
) -> dict[str, Any]:
    """Random inputs of the preset's shapes (seed 0): latents and text states in ``dtype``, the
    rest (timestep, position ids, guidance) as the host's pipeline passes them."""
    p = PRESETS[preset]
    inputs = host(preset).inputs(p, batch, sample or p["sample"], torch.Generator().manual_seed(0))
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            inputs[name] = value.to(device, dtype) if name in STATES else value.to(device)
    return inputs


def lora_params(model: nn.Module, preset: str, rank: int = LORA_RANK) -> int:
    """Trainable parameters of LoRA ``rank`` on the host's LoRA targets (``core.parity``)."""
    return lora_parameters(model, host(preset).target_modules, rank)


def parity_atoms(model: nn.Module, preset: str, rank: int = LORA_RANK) -> int:
    """Atoms per module whose trainable parameters come nearest LoRA ``rank``'s on the host's LoRA
    targets: ``core.parity.parity_atoms`` with the atom settings the harness trains (a multiple of
    the heads on PixArt, any count on hosts whose processors pad an uneven split)."""
    config = replace(method_config("atoms", "parity"), rank=rank)
    return config.resolved(model, host(preset).target_modules).num_atoms


def atom_parameters(model: nn.Module, count: int) -> int:
    """Trainable parameters of ``count`` atoms per module, with the atom settings the harness trains."""
    return parameters_per_atom(model, _shapes_only())[0] * count


def _shapes_only():
    return method_config("atoms", 1).atom_config()  # which modules, placement, encoder layout


def resolve_atoms(entries: tuple[str | int, ...], preset: str) -> tuple[int, ...]:
    """``"parity"`` → the atom count at LoRA r=16's parameters (``parity_atoms``); numbers as given,
    checked against the heads they must split over. Reads the preset's model on the meta device."""
    model = build_transformer(preset, "meta", torch.float32)  # shapes only
    multiple = parameters_per_atom(model, _shapes_only())[1]
    counts = []
    for entry in entries:
        if entry == "parity":
            counts.append(parity_atoms(model, preset))
        else:
            counts.append(check_atom_count(entry, multiple))
    return tuple(dict.fromkeys(counts))
