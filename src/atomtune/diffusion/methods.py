"""One place that puts a fine-tuning method on a diffusion transformer: atoms, LoRA, DoRA or OFT.

All four adapt the host in place, base frozen, so the trainer and the pipeline do not care which one
runs: atoms its attention modules, the baselines the projections its LoRA script adapts (PixArt:
``to_q, to_k, to_v, to_out.0``; each host's spec names its own). The baselines come from PEFT with the
paper's settings: LoRA and DoRA rank 16 (``lora_alpha`` = rank), OFT ``r=4`` blocks. Atoms default to
as many trainable parameters as that LoRA (``num_atoms="parity"``, counted on the model at hand).

An adapter folder holds the method's own files (atomtune's ``adapter_config.json`` +
``adapter_model.safetensors``, or PEFT's files of the same names) and ``atomtune.json``: the method,
the base model's name and class, and the shapes of the adapted projections. Loading checks those
shapes against the model first, so an adapter for another model fails with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.model import AtomModel
from atomtune.core.parity import parity_atoms
from atomtune.diffusion.peft_tuned import PeftTuned
from atomtune.diffusion.tuned import TARGET_MODULES, AtomTuned, Tuned
from atomtune.errors import AtomtuneError

METHODS = ("atoms", "lora", "dora", "oft")
# Atoms per module by default: as many trainable parameters as the LoRA baseline (rank ``rank``, 16
# by default) on the host's LoRA targets (``core.parity``): 64 on PixArt-Σ (2·1152·64 + 64 = 147,520
# per module against 4·16·2·1152 = 147,456), 83 on SD3.5-M, 128 on Flux.1-dev, 48 on Sana-1600M.
# Cut to 6 during training (``DEFAULT_ATOM_BUDGET``), as measured on the testbed.
PARITY = "parity"
DEFAULT_NUM_ATOMS = PARITY
DEFAULT_ATOM_BUDGET = 6


@dataclass
class MethodConfig:
    """Which method, and its few settings (the rest are the paper's or the core's defaults)."""

    method: str = "atoms"
    num_atoms: int | str = DEFAULT_NUM_ATOMS  # a count, or "parity": LoRA rank ``rank``'s parameters
    rank: int = 16
    oft_r: int = 4
    atoms: dict[str, Any] = field(default_factory=dict)  # further AtomConfig fields
    atom_budget: int = DEFAULT_ATOM_BUDGET  # atoms kept per module after training; 0 keeps all

    def __post_init__(self) -> None:
        check_method(self.method)
        check_num_atoms(self.num_atoms)
        for name in ("rank", "oft_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AtomtuneError(f"{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.atom_budget, int)
            or isinstance(self.atom_budget, bool)
            or self.atom_budget < 0
        ):
            raise AtomtuneError(
                f"atom_budget must be an integer >= 0 (0: keep all), got {self.atom_budget!r}"
            )
        reserved = {"num_atoms", "atom_budget", "mode", "base_model_name_or_path"}
        reserved = sorted(set(self.atoms) & reserved)
        if reserved:
            raise AtomtuneError(f"set {reserved[0]} through its own option, not in the atoms settings")
        if self.method == "atoms":
            self._atom_config(None, 1 if self.num_atoms == PARITY else self.num_atoms)  # validate early

    def resolved(self, model: nn.Module, target_modules: tuple[str, ...] | None = None) -> MethodConfig:
        """This config with ``num_atoms="parity"`` replaced by the count for ``model``: the atoms per
        module whose parameters come nearest LoRA rank ``rank`` on ``target_modules`` (the host's
        LoRA targets; default PixArt's)."""
        if self.num_atoms != PARITY:
            return self
        shape_only = self._atom_config(None, 1)  # which modules, placement, encoder layout
        count = parity_atoms(model, shape_only, list(target_modules or TARGET_MODULES), self.rank)
        return replace(self, num_atoms=count)

    def atom_config(self, base: str | None = None) -> AtomConfig:
        if self.num_atoms == PARITY:
            raise AtomtuneError("num_atoms='parity' is a count for a model: resolve it first (resolved())")
        return self._atom_config(base, self.num_atoms)

    def _atom_config(self, base: str | None, num_atoms: int) -> AtomConfig:
        budget = self.atom_budget if 0 < self.atom_budget < num_atoms else None
        return AtomConfig.from_dict(
            {
                "num_atoms": num_atoms,
                "atom_budget": budget,
                **self.atoms,
                "mode": "attention",
                "base_model_name_or_path": base,
            }
        )

    def peft_config(self, base: str | None = None, target_modules: tuple[str, ...] | None = None):
        """PEFT's config for the baseline, on ``target_modules`` (default: PixArt's attention
        projections; the workflows pass the host's, from its spec)."""
        from peft import LoraConfig, OFTConfig

        targets = list(target_modules or TARGET_MODULES)
        if self.method == "oft":
            return OFTConfig(
                r=self.oft_r, oft_block_size=0, target_modules=targets, base_model_name_or_path=base
            )
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,
            use_dora=self.method == "dora",
            target_modules=targets,
            base_model_name_or_path=base,
        )

    def describe(self, target_modules: tuple[str, ...] | None = None) -> str:
        if self.method == "atoms":
            parity = self.num_atoms == PARITY
            c = self._atom_config(None, 1 if parity else self.num_atoms)
            count = f"LoRA rank {self.rank}'s parameter count in atoms" if parity else c.num_atoms
            budget = self.atom_budget if parity else c.atom_budget
            kept = f", cut to {budget} by contribution" if budget else ""
            return (
                f"atoms: {count} per attention module{kept} ({c.attention}-attention, {c.placement}), "
                f"shrinkage {c.shrinkage}, L1 weight {c.sparsity_weight}, orthogonality weight "
                f"{c.orthogonality_weight}"
            )
        targets = ", ".join(target_modules or TARGET_MODULES)
        if self.method == "oft":
            return f"OFT (PEFT), r={self.oft_r} blocks on {targets}"
        name = "DoRA" if self.method == "dora" else "LoRA"
        return f"{name} (PEFT), rank {self.rank}, alpha {self.rank} on {targets}"


def check_num_atoms(value: object) -> None:
    if value != PARITY and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise AtomtuneError(f"num_atoms must be a positive integer or {PARITY!r}, got {value!r}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise AtomtuneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# -- apply and load -----------------------------------------------------------------------------
def _float32_trainables(tuned: Tuned) -> None:
    """Adapters train in float32 on a half-precision base (as PEFT and the core do)."""
    for p in tuned.trainable_parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def apply_method(
    model: nn.Module,
    config: MethodConfig,
    pretrained: str | None,
    name: str = "default",
    target_modules: tuple[str, ...] | None = None,
) -> Tuned:
    """Inject a fresh adapter of ``config.method`` into ``model`` (in place, base frozen); the PEFT
    baselines on ``target_modules`` (default: PixArt's; a host's spec names its own)."""
    if config.method == "atoms":
        config = config.resolved(model, target_modules)
        tuned: Tuned = AtomTuned(AtomModel(model, config.atom_config(pretrained), name), pretrained)
    else:
        from peft import inject_adapter_in_model

        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            inject_adapter_in_model(config.peft_config(pretrained, target_modules), model, adapter_name=name)
        except ValueError as exc:
            raise AtomtuneError(f"{config.method} does not fit this model: {exc}") from exc
        tuned = PeftTuned(model, config.method, [name], pretrained, requires_grad)
        tuned.target_modules = target_modules
        tuned.activate()
    _float32_trainables(tuned)
    return tuned
