"""A method put on the measured host, exactly as ``atomtune train`` puts it on.

Atoms and the PEFT baselines go through ``diffusion.methods.apply_method`` with ``MethodConfig``'s
settings (LoRA and DoRA rank 16 with alpha 16, OFT r=4, on the host's LoRA targets), so the adapters
timed here are the ones trained, not a second copy of their settings that could drift. Every adapter
trains in float32 whatever the host's precision, as in training. The atom variants differ only in
the attention path: ``atoms_separate`` computes the coefficients in a second attention call, and
``atoms_padcat`` forces the per-call pad/concat path on every device (``attention_path``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from atomtune.core.hosts import diffusers as dx
from atomtune.diffusion.methods import MethodConfig
from atomtune.diffusion.methods import apply_method as apply_training_method
from atomtune.diffusion.tuned import AtomTuned, Tuned
from atomtune.errors import AtomtuneError
from atomtune.speed.settings import ATOM_METHODS, METHODS


def method_config(method: str, num_atoms: int | str) -> MethodConfig:
    """The training settings of ``method``; atoms keep all ``num_atoms`` (no budget cuts)."""
    if method in ATOM_METHODS:
        fused = method != "atoms_separate"  # coefficients in the values' attention call, or a second
        return MethodConfig(
            "atoms", num_atoms=num_atoms, atom_budget=0, atoms={"fused": fused}, form="attention"
        )  # the attention form: what the speed figures measure
    if method not in METHODS or method == "bare":
        raise AtomtuneError(f"unknown method {method!r}; choose from {', '.join(METHODS[1:])}")
    return MethodConfig(method)


def apply_method(
    model: nn.Module, method: str, num_atoms: int, target_modules: tuple[str, ...] | None = None
) -> Tuned:
    """Adapt ``model`` in place (base frozen), the PEFT baselines on ``target_modules`` (the host's
    LoRA targets; default PixArt's); atoms get trained-looking ``D != 0``.

    ``D`` starts at zero, and pruning ranks atoms by ``‖w_s‖·‖d‖``: all zero would leave nothing to rank.
    """
    config = method_config(method, num_atoms)
    tuned = apply_training_method(model, config, None, target_modules=target_modules)
    if isinstance(tuned, AtomTuned):
        for a in tuned.handle.atoms().values():
            torch.nn.init.normal_(a.D, std=1e-3)
    return tuned


def adapt(
    model: nn.Module, method: str, num_atoms: int, target_modules: tuple[str, ...] | None = None
) -> Tuned | None:
    """``apply_method``, or freeze the model for ``bare`` (no adapter: ``None``)."""
    if method == "bare":
        model.requires_grad_(False)
        return None
    return apply_method(model, method, num_atoms, target_modules)


@contextmanager
def attention_path(method: str) -> Iterator[None]:
    """``atoms_padcat`` measures the per-call pad/concat path on every device."""
    if method != "atoms_padcat":
        yield
        return
    devices = dx.PADDED_PROJECTION_DEVICES
    dx.PADDED_PROJECTION_DEVICES = ()
    try:
        yield
    finally:
        dx.PADDED_PROJECTION_DEVICES = devices
