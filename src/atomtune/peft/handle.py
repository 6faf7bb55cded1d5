"""``atoms_of``: ``AtomModel``'s operations on the atoms PEFT put into a model; both folder formats.

Importance (``AtomStatistics``, ``weight_importance``), masks, gains, top-k, prune, merge, the
regularisation, the atom budget and atomtune's adapter folders all take an ``AtomModel``.
``PeftAtoms`` is one whose layers are the core layers inside PEFT's (see ``layer``), so the same
functions run on a ``PeftModel``, or on a model PEFT injected into (``transformer.add_adapter``),
on the very tensors PEFT trains and saves. PEFT keeps the adapters' life: adding, switching,
disabling, deleting and unloading go through it, and ``prune`` records the new sizes in the
adapter's ``AtomsPeftConfig.atoms_pattern`` so that ``save_pretrained`` / ``from_pretrained`` keep them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peft import PeftConfig, PeftModel, get_peft_model_state_dict, inject_adapter_in_model
from peft import set_peft_model_state_dict as _set_state
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, delete_adapter, set_adapter
from peft.utils import SAFETENSORS_WEIGHTS_NAME, _get_submodules
from safetensors.torch import save_file
from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.model import AtomModel
from atomtune.core.serialization import CONFIG_NAME, read_adapter_tensors
from atomtune.core.targets import find_targets
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write, read_json
from atomtune.peft.config import AtomsPeftConfig
from atomtune.peft.layer import AtomsLayer

PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the tensors


def atoms_of(model: nn.Module) -> PeftAtoms:
    """``AtomModel``'s operations on the atoms of ``model``: a ``PeftModel``, PEFT's ``AtomsModel``,
    or a model with atoms injected (``add_adapter``, ``inject_adapter_in_model``)."""
    return PeftAtoms(model)


def base_model(model: nn.Module) -> nn.Module:
    """The model PEFT adapted, under a ``PeftModel`` or a tuner."""
    if isinstance(model, PeftModel):
        return model.base_model.model
    return model.model if isinstance(model, BaseTuner) else model


class PeftAtoms(AtomModel):
    """An ``AtomModel`` over PEFT's atom layers; module names are the base model's."""

    def __init__(self, model: nn.Module) -> None:  # injects nothing and freezes nothing, unlike AtomModel
        self.peft_model = model if isinstance(model, (PeftModel, BaseTuner)) else None
        self.model = base_model(model)
        self._requires_grad: dict[str, bool] = {}

    # -- what AtomModel keeps itself, read from PEFT ------------------------------------------
    def _peft_layers(self) -> dict[str, AtomsLayer]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, AtomsLayer)}

    def layers(self) -> dict:
        return {name: layer.core for name, layer in self._peft_layers().items()}

    @property
    def configs(self) -> dict[str, AtomConfig]:
        """Each atoms adapter's ``AtomConfig``, on the modules it adapts (named one by one)."""
        modules: dict[str, list[str]] = {}
        for name, layer in self._peft_layers().items():
            for adapter in layer.atoms_dict:
                modules.setdefault(adapter, []).append(name)
        return {
            adapter: config.to_atom_config(modules.get(adapter, []))
            for adapter, config in getattr(self.model, "peft_config", {}).items()
            if isinstance(config, AtomsPeftConfig)
        }

    @property
    def active_adapter(self) -> str | None:
        for layer in self._peft_layers().values():
            names = list(layer.active_adapters)
            if len(names) > 1:
                raise AtomtuneError(
                    f"adapters {', '.join(names)} are active together; atomtune's operations take "
                    f"one: set_adapter(name) first"
                )
            return names[0] if names else None
        return None

    def targets(self, config: AtomConfig) -> list[tuple[str, nn.Module]]:
        """As ``AtomModel.targets``, with each PEFT layer standing for the layer it wraps."""
        return find_targets(self.model, config, _unwrapped(self.model))

    # -- the adapters' life, through PEFT ------------------------------------------------------
    def add_adapter(self, name: str, config: AtomConfig, num_atoms: dict[str, int] | None = None) -> None:
        """Add and activate adapter ``name`` through PEFT (``num_atoms``: M per module, pruned adapters)."""
        if name in getattr(self.model, "peft_config", {}):
            raise AtomtuneError(f"adapter {name!r} exists already")
        modules = [m for m, _ in self.targets(config) if num_atoms is None or m in num_atoms]
        pattern = {m: num_atoms[m] for m in modules if num_atoms[m] != config.num_atoms} if num_atoms else {}
        self.inject(name, AtomsPeftConfig.from_atom_config(config, modules, pattern))
        placed = set(self.atoms(name))
        if placed != set(modules):  # a name that is also the suffix of another module's name
            self.delete_adapter(name)
            raise AtomtuneError(f"PEFT placed {name!r} on other modules ({sorted(placed ^ set(modules))[0]})")
        self.set_adapter(name)

    def inject(self, name: str, config: AtomsPeftConfig) -> None:
        """Put adapter ``name`` in as the model's own PEFT route would: ``PeftModel.add_adapter``, the
        tuner's ``inject_adapter``, or ``add_adapter`` / ``inject_adapter_in_model`` in place."""
        wrapper = self.peft_model
        if isinstance(wrapper, PeftModel):
            wrapper.add_adapter(name, config)
        elif isinstance(wrapper, BaseTuner):
            wrapper.peft_config[name] = config
            wrapper.inject_adapter(wrapper.model, name)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                if callable(getattr(self.model, "add_adapter", None)):  # diffusers', transformers' mixin
                    self.model.add_adapter(config, adapter_name=name)
                else:
                    inject_adapter_in_model(config, self.model, name)

    def set_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise AtomtuneError(f"no atoms adapter named {name!r}; have {', '.join(self.configs) or 'none'}")
        if self.peft_model is not None:
            self.peft_model.set_adapter(name)
        else:
            set_adapter(self.model, name, layer_cls=BaseTunerLayer)

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise AtomtuneError(f"no atoms adapter named {name!r}")
        if self.peft_model is not None:
            self.peft_model.delete_adapter(name)
        else:
            delete_adapter(self.model, name, prefix="atoms_", layer_cls=AtomsLayer)
            del self.model.peft_config[name]

    @contextmanager
    def disable(self) -> Iterator[None]:
        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        enabled = [not layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer, was in zip(layers, enabled, strict=True):
                layer.enable_adapters(was)

    def unload(self) -> nn.Module:
        """Every atom layer replaced by the layer it wraps; the bare model."""
        if self.peft_model is not None:
            return self.peft_model.unload()
        for name in self._peft_layers():
            parent, target, child = _get_submodules(self.model, name)
            setattr(parent, child, target.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def prune(self, adapter: str | None = None) -> dict[str, int]:
        """``AtomModel.prune``, and the sizes left recorded in the adapter's ``atoms_pattern``."""
        adapter = adapter or self.active_adapter
        sizes = super().prune(adapter)
        config = self.model.peft_config[adapter]
        config.atoms_pattern = {m: n for m, n in sizes.items() if n != config.num_atoms}
        return sizes


def _unwrapped(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with each PEFT layer replaced by the layer it wraps, its insides skipped."""
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside = name + "."
            yield name, module.get_base_layer()
        else:
            yield name, module


# -- folders -------------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module, directory: str | Path, adapter_name: str = "default", format: str = "peft"
) -> Path:
    """Write atoms adapter ``adapter_name`` of ``model`` (a ``PeftModel`` or a model PEFT injected
    into) as PEFT's adapter folder, what ``PeftModel.save_pretrained`` writes (``format="peft"``:
    ``PeftModel.from_pretrained`` and ``load_adapter`` read it), or as atomtune's
    (``format="atomtune"``: ``AtomModel.load``, ``atomtune generate`` read it)."""
    if format == "atomtune":
        return atoms_of(model).save(directory, adapter_name)
    if format != "peft":
        raise AtomtuneError(f"format must be peft or atomtune; got {format!r}")
    base = base_model(model)
    config = getattr(base, "peft_config", {}).get(adapter_name)
    if not isinstance(config, AtomsPeftConfig):
        raise AtomtuneError(f"the model has no atoms adapter named {adapter_name!r}")
    state = get_peft_model_state_dict(base, adapter_name=adapter_name, save_embedding_layers=False)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(
        directory / SAFETENSORS_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
    )
    config.save_pretrained(str(directory))
    return directory


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load an atoms adapter folder into ``model`` as adapter ``adapter_name`` and activate it.

    Either format: PEFT's (``save_pretrained``, ``save_adapter``) or atomtune's (``AtomModel.save``,
    ``atomtune train``; linear mode), told apart by ``adapter_config.json``. A ``PeftModel`` gets it
    as one more adapter; any other model gets it in place, as ``add_adapter`` puts adapters. Every
    tensor must find its place and fit. Returns ``model``.
    """
    handle = atoms_of(model)
    meta = read_json(Path(directory) / CONFIG_NAME)
    if not isinstance(meta, dict) or "peft_type" not in meta:
        handle.load_adapter(directory, adapter_name)  # atomtune's format, checked field by field
        return model
    config = PeftConfig.from_pretrained(str(directory))
    if not isinstance(config, AtomsPeftConfig):
        raise AtomtuneError(f"{directory} holds a {meta['peft_type']} adapter, not atoms")
    tensors = read_adapter_tensors(directory)
    handle.inject(adapter_name, config)
    try:
        result = _set_state(handle.model, tensors, adapter_name=adapter_name)
        ours = f".atoms_dict.{adapter_name}."
        missing = [k for k in result.missing_keys if ours in k]
        if missing or result.unexpected_keys:
            what = (
                f"lacks {missing[0]}"
                if missing
                else f"holds {result.unexpected_keys[0]}, which the model lacks"
            )
            raise AtomtuneError(f"{Path(directory) / SAFETENSORS_WEIGHTS_NAME} {what}")
    except Exception:
        handle.delete_adapter(adapter_name)
        raise
    handle.set_adapter(adapter_name)
    return model
