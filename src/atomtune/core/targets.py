"""Which modules of a host model get atoms: ``AtomConfig``'s mode, attention side, names and layers.

Its own module because both ``AtomModel`` (to inject) and the adapter format (to load into the same
modules) need it, and the adapter format must not import the model handle.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.hosts import diffusers as dx
from atomtune.core.hosts.transformers import linear_shape
from atomtune.errors import AtomtuneError

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """First integer component of a module name: ``transformer_blocks.3.attn1`` → 3."""
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None


def _name_matches(name: str, target: str | list[str] | None) -> bool:
    if target is None:
        return True
    if isinstance(target, str):
        return re.search(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def has_part(name: str, parts: Iterable[str]) -> bool:
    """Whether one of ``parts`` is a run of ``name``'s dotted components: ``attn1``, ``to_q``,
    ``attn1.to_q`` and ``transformer_blocks.3`` are parts of ``transformer_blocks.3.attn1.to_q``."""
    return any(f".{part}." in f".{name}." for part in parts)


def check_parts(names: Iterable[str], parts: Iterable[str]) -> None:
    """Refuse a part that no one of ``names`` (the adapted modules) has."""
    names = list(names)
    for part in parts:
        if not any(has_part(name, [part]) for name in names):
            raise AtomtuneError(f"no adapted module has {part!r} in its name")


def find_targets(
    model: nn.Module, config: AtomConfig, modules: Iterable[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects, in model order; an error if it selects none.

    ``modules``: the ``(name, module)`` pairs to choose from, ``model.named_modules()`` by default (a
    model whose layers another library wrapped passes the layers it wrapped, under their names)."""
    found = []
    for name, module in model.named_modules() if modules is None else modules:
        if config.mode == "attention":
            if not dx.is_attention(module):
                continue
            if config.attention != "both" and dx.attention_kind(module) != config.attention:
                continue
        elif linear_shape(module) is None:
            continue
        if not _name_matches(name, config.target_modules):
            continue
        if config.layers is not None and layer_index(name) not in config.layers:
            continue
        found.append((name, module))
    if not found:
        raise AtomtuneError(
            f"no module of {type(model).__name__} matches this config (mode={config.mode}, "
            f"attention={config.attention}, target_modules={config.target_modules!r}, layers={config.layers})"
        )
    return found
