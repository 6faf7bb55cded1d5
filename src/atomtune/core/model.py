"""``AtomModel``: inject atom adapters into a model and manage them (PEFT's tuner-model role).

The handle changes the model in place and keeps no copy: the model stays the object a pipeline
already holds (``pipe.transformer``), so diffusers and transformers code keeps working on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.hosts import diffusers as dx
from atomtune.core.hosts.transformers import linear_shape
from atomtune.core.layer import AtomAttention, AtomLayer, AtomLinear, Atoms
from atomtune.core.losses import orthogonality
from atomtune.core.targets import find_targets
from atomtune.errors import AtomtuneError


def _add_linear_update(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    delta = module.atoms(args[0])
    return output if delta is None else output + delta


class AtomModel:
    """Atom adapters injected into ``model``, several by name, one active.

    Example::

        atoms = AtomModel(transformer, AtomConfig(num_atoms=64))
        loss = task_loss + atoms.regularization_loss()
        atoms.save("my-adapter")
        atoms = AtomModel.load(fresh_transformer, "my-adapter")
    """

    def __init__(self, model: nn.Module, config: AtomConfig | None = None, adapter_name: str = "default"):
        self.model = model
        self.configs: dict[str, AtomConfig] = {}
        self.active_adapter: str | None = None
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: AtomConfig, num_atoms: dict[str, int] | None = None) -> None:
        """Add and activate adapter ``name``; ``num_atoms`` overrides M per module (pruned adapters)."""
        if name in self.configs:
            raise AtomtuneError(f"adapter {name!r} exists already")
        if not name.isidentifier():
            raise AtomtuneError(f"adapter name must be an identifier, got {name!r}")
        for module_name, module in self.targets(config):
            layer = self._layer_for(module_name, module, config)
            m = None if num_atoms is None else num_atoms.get(module_name)
            if num_atoms is not None and m is None:
                continue
            if config.mode == "attention":
                in_features, out, _ = dx.attention_shape(module, config.placement, config.joint_encoder)
                if in_features != layer.in_features:
                    raise AtomtuneError(
                        f"{module_name}: joint_encoder={config.joint_encoder!r} differs from the "
                        f"module's first adapter; adapters of one model share the encoder layout"
                    )
            else:
                out = linear_shape(module)[1]
            layer.add_adapter(name, config, out, next(module.parameters()), m)
        self.configs[name] = config
        self.set_adapter(name)

    def targets(self, config: AtomConfig) -> list[tuple[str, nn.Module]]:
        """The modules ``config`` selects in the model, by name (``targets.find_targets``)."""
        return find_targets(self.model, config)

    def _layer_for(self, name: str, module: nn.Module, config: AtomConfig) -> AtomLayer:
        layer = getattr(module, "atoms", None)
        if layer is not None:
            return layer
        if config.mode == "attention":
            in_features, _, heads = dx.attention_shape(module, config.placement, config.joint_encoder)
            layer = AtomAttention(in_features, heads)
            dx.attach(module, layer, name)
        else:
            layer = AtomLinear(linear_shape(module)[0])
            module.add_module("atoms", layer)
            layer.hook = module.register_forward_hook(_add_linear_update)
        return layer

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter: only its parameters train and act."""
        if name not in self.configs:
            raise AtomtuneError(f"no adapter named {name!r}; have {', '.join(self.configs) or 'none'}")
        for layer in self.layers().values():
            layer.active_adapter = name if name in layer.adapters else None
            for adapter_name, atoms in layer.adapters.items():
                for pname, p in atoms.named_parameters():
                    learn = adapter_name == name and (
                        pname != "lam" or self.configs[adapter_name].learn_lambda
                    )
                    p.requires_grad_(learn)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise AtomtuneError(f"no adapter named {name!r}")
        for layer in self.layers().values():
            if name in layer.adapters:
                layer.delete_adapter(name)
        del self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @contextmanager
    def disable(self) -> Iterator[None]:
        """Run the pretrained model: every adapter silent inside the block."""
        layers = list(self.layers().values())
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous, strict=True):
                layer.disabled = was

    def unload(self) -> nn.Module:
        """Remove every adapter and return the bare model, with its parameters' trainability restored."""
        for module in list(self.model.modules()):
            layer = getattr(module, "atoms", None)
            if not isinstance(layer, AtomLayer):
                continue
            if isinstance(layer, AtomAttention):
                dx.detach(module)
            else:
                layer.hook.remove()
                del module.atoms
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))
        self.configs.clear()
        self.active_adapter = None
        return self.model

    # -- access ---------------------------------------------------------------------------------
    def layers(self) -> dict[str, AtomLayer]:
        """Adapted modules by name (the name of the host module, e.g. ``transformer_blocks.0.attn1``)."""
        return {
            name: module.atoms
            for name, module in self.model.named_modules()
            if isinstance(getattr(module, "atoms", None), AtomLayer)
        }

    def atoms(self, adapter: str | None = None) -> dict[str, Atoms]:
        """Each module's ``Atoms`` of ``adapter`` (default: the active one)."""
        adapter = adapter or self.active_adapter
        return {
            name: layer.adapters[adapter]
            for name, layer in self.layers().items()
            if adapter in layer.adapters
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for atoms in self.atoms().values() for p in atoms.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # -- training -------------------------------------------------------------------------------
    def regularization_terms(self) -> dict[str, torch.Tensor]:
        """The penalties' values: ``l1`` (mean |S| of the last forward) and ``orthogonality``, averaged
        over adapted modules (so each module feels ``weight / modules``)."""
        sparsity, ortho = [], []
        for layer in self.layers().values():
            atoms = layer.active
            if atoms is None:
                continue
            if layer.last_sparsity is not None:
                sparsity.append(layer.last_sparsity)
                layer.last_sparsity = None
            ortho.append(orthogonality(atoms.D))
        zero = torch.zeros((), device=next(self.model.parameters()).device)
        return {
            "l1": torch.stack(sparsity).mean() if sparsity else zero,
            "orthogonality": torch.stack(ortho).mean() if ortho else zero,
        }

    def activity(self) -> dict[str, float]:
        """True sparsity of the last training forward, averaged over adapted modules: the share of
        zero coefficients among live (unmasked) atoms, and the live atoms active per token."""
        active, live = [], []
        for layer in self.layers().values():
            if layer.active is None or layer.last_activity is None:
                continue
            nonzero, tokens, n_live = layer.last_activity
            layer.last_activity = None
            active.append(nonzero.double() / tokens)
            live.append(n_live.double().clamp(min=1))
        if not active:
            return {}
        per_token, zero = torch.stack(active), 1 - torch.stack(active) / torch.stack(live)
        values = torch.stack([zero.mean(), per_token.mean()]).tolist()  # one device sync per step
        return {"zero_share": values[0], "active_per_token": values[1]}

    def regularization_loss(self) -> torch.Tensor:
        """``sparsity_weight·L1(S) + orthogonality_weight·‖offdiag(D̂D̂ᵀ)‖²``; call once after each forward."""
        return self.weigh(self.regularization_terms())

    def weigh(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The active adapter's weighted sum of ``regularization_terms``."""
        config = self.configs[self.active_adapter]
        return config.sparsity_weight * terms["l1"] + config.orthogonality_weight * terms["orthogonality"]

    # -- steering -------------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, torch.Tensor], adapter: str | None = None) -> None:
        """Keep (1) or silence (0) atoms per module; modules not named keep all their atoms."""
        for name, atoms in self._atoms_named(masks, adapter).items():
            atoms.mask.copy_(_per_atom(masks[name], atoms, name, "mask").float())

    def set_gains(
        self, gains: dict[str, torch.Tensor | dict[int, float]], adapter: str | None = None
    ) -> None:
        """Scale atoms per module: a full tensor (M,), or ``{atom_id: gain}`` for single atoms."""
        for name, atoms in self._atoms_named(gains, adapter).items():
            value = gains[name]
            if isinstance(value, dict):
                for atom_id, g in value.items():
                    atoms.gain[_position(atoms, atom_id, name)] = g
            else:
                atoms.gain.copy_(_per_atom(value, atoms, name, "gain"))

    def reset_steering(self, adapter: str | None = None) -> None:
        for atoms in self.atoms(adapter).values():
            atoms.mask.fill_(1.0)
            atoms.gain.fill_(1.0)

    def _atoms_named(self, names: dict, adapter: str | None) -> dict[str, Atoms]:
        all_atoms = self.atoms(adapter)
        missing = sorted(set(names) - set(all_atoms))
        if missing:
            raise AtomtuneError(f"no adapted module named {missing[0]!r}")
        return {name: all_atoms[name] for name in names}

    def prune(self, adapter: str | None = None) -> dict[str, int]:
        """Drop masked atoms for good (see ``selection.prune``); returns atoms left per module."""
        from atomtune.core.selection import prune

        return prune(self, adapter)

    def merge(
        self, first: str, second: str, name: str, how: str = "sum", first_only: Sequence[str] = ()
    ) -> None:
        """Add adapter ``name`` merging ``first`` and ``second`` (see ``merge.merge_adapters``)."""
        from atomtune.core.merge import merge_adapters

        merge_adapters(self, first, second, name, how, first_only)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path, adapter: str | None = None) -> Path:
        from atomtune.core.serialization import save_adapter

        return save_adapter(self, directory, adapter or self.active_adapter)

    def load_adapter(self, directory: str | Path, adapter_name: str = "default") -> None:
        from atomtune.core.serialization import load_adapter

        load_adapter(self, directory, adapter_name)

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path, adapter_name: str = "default") -> AtomModel:
        """Inject the adapter saved in ``directory`` into ``model``, after checking it fits."""
        handle = cls(model)
        try:
            handle.load_adapter(directory, adapter_name)
        except Exception:
            handle.unload()
            raise
        return handle


def _per_atom(value: torch.Tensor, atoms: Atoms, name: str, what: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=atoms.gain.dtype, device=atoms.gain.device)
    if value.shape != (atoms.num_atoms,):
        raise AtomtuneError(
            f"{what} for {name} has shape {tuple(value.shape)}, expected ({atoms.num_atoms},)"
        )
    return value


def _position(atoms: Atoms, atom_id: int, name: str) -> int:
    hits = (atoms.atom_ids == atom_id).nonzero()
    if len(hits) == 0:
        raise AtomtuneError(f"{name} has no atom {atom_id}")
    return int(hits[0])
