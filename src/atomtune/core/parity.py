"""Atoms at parameter parity with LoRA: how many atoms per module train as many parameters as LoRA
rank ``r`` on the modules LoRA adapts.

Why a count and not a fixed number: a comparison with LoRA is only fair at equal trainable
parameters, and LoRA's count depends on the host (its widths, and which projections its training
script adapts: Flux's also the feed-forward layers, Sana's only q, k, v), so one default ``M`` would
be generous on one host and stingy on the next. Both counts are read from the model's shapes alone,
so a model built on the ``meta`` device answers for a full-size host without its weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.hosts import diffusers as dx
from atomtune.core.hosts.transformers import linear_shape
from atomtune.core.targets import find_targets
from atomtune.errors import AtomtuneError


def lora_parameters(model: nn.Module, target_modules: Sequence[str], rank: int = 16) -> int:
    """Trainable parameters of LoRA ``rank`` on ``target_modules``: ``rank·(in + out)`` per linear.

    A module is a target as PEFT matches a list of names: its name equals a target or ends with
    ``"." + target``.
    """
    total = 0
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and any(name == t or name.endswith("." + t) for t in target_modules):
            total += rank * (shape[0] + shape[1])
    if total == 0:
        raise AtomtuneError(f"no linear layer of {type(model).__name__} matches {list(target_modules)}")
    return total


def parameters_per_atom(model: nn.Module, config: AtomConfig) -> tuple[int, int]:
    """(parameters one more atom per module costs, summed over the modules ``config`` adapts; the
    head count the atoms must divide over, 1 if any split is allowed).

    An atom trains a column of ``W_s`` (the context width), a row of ``D`` (the width of ``ΔO``) and
    its threshold λ in every adapted module.
    """
    total, multiple = 0, 1
    for _, module in find_targets(model, config):
        if config.mode == "attention":
            context, out, heads = dx.attention_shape(module, config.placement, config.joint_encoder)
            if dx.even_heads_only(module):
                multiple = max(multiple, heads)
        else:
            context, out = linear_shape(module)
        total += context + out + 1
    return total, multiple


def parity_atoms(model: nn.Module, config: AtomConfig, target_modules: Sequence[str], rank: int = 16) -> int:
    """Atoms per module whose trainable parameters come nearest LoRA ``rank`` on ``target_modules``.

    In linear mode (atoms on LoRA's own projections) the most atoms that do not exceed LoRA's
    parameters: an atom costs a threshold more than a rank, so nearest would always land just
    above. Where the atoms must split evenly over the heads (PixArt's processor), the nearest
    multiple of the head count. Never fewer than one (or one per head).
    """
    per_atom, multiple = parameters_per_atom(model, config)
    lora = lora_parameters(model, target_modules, rank)
    if config.mode == "linear":
        return max(1, lora // per_atom)
    return max(multiple, round(lora / per_atom / multiple) * multiple)
