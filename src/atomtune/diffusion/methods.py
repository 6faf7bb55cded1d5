"""One place that puts a fine-tuning method on a diffusion transformer: atoms, LoRA, DoRA or OFT.

All four adapt the host in place, base frozen, so the trainer and the pipeline do not care which one
runs. The baselines come from PEFT with the paper's settings on the projections the host's LoRA
script adapts (PixArt: ``to_q, to_k, to_v, to_out.0``; each host's spec names its own): LoRA and
DoRA rank 16 (``lora_alpha`` = rank), OFT ``r=4`` blocks. Atoms take one of two forms:

- ``"projections"`` (the default): the same projections LoRA adapts, each with its own dictionary,
  ``ΔY = σ_λ(X·W_s)·D``. Measured on the testbed and the VAE, this is the form that keeps the concept
  (docs/quality.md): LoRA's strength comes from changing q, k, v and out together.
- ``"attention"``: the paper's update on the attention modules, ``ΔO = σ_λ(A·X·W_s)·D``. It changes
  only the value path (without shrinkage it is a rank-M LoRA on ``to_v``), and measures so.

Atoms default to 150 per projection cut to 15 during training (at LoRA r16's parameters), or, in
the attention form, to as many trainable parameters as that LoRA (``num_atoms="parity"``, counted
on the model at hand).

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
FORMS = ("projections", "attention")
DEFAULT_FORM = "projections"
# Atoms per module by default, per form. On the projections, 150 per projection, cut by
# contribution to DEFAULT_ATOM_BUDGET = 15 during training: the shipped adapter has 15·(in + out + 1)
# parameters per projection, at LoRA r16's 16·(in + out) (the bench compares at equal parameters),
# and at most 15 of the 150 atoms (10%) act per token. Chosen on the testbed's selection seeds
# against 64 cut to 6 (docs/quality.md). In the attention form, "parity": as many trainable
# parameters as LoRA rank ``rank`` on the host's LoRA targets (``core.parity``): 64 per module on
# PixArt-Σ, 83 on SD3.5-M, 128 on Flux.1-dev, 48 on Sana-1600M. "parity" on the projections is
# ``rank - 1`` per projection (an atom costs one threshold more than a rank of LoRA).
PARITY = "parity"
DEFAULT_NUM_ATOMS: dict[str, int | str] = {"projections": 150, "attention": PARITY}
DEFAULT_ATOM_BUDGET = 15  # atoms kept per module after training (0: all)


@dataclass
class MethodConfig:
    """Which method, and its few settings (the rest are the paper's or the core's defaults)."""

    method: str = "atoms"
    num_atoms: int | str | None = None  # a count, "parity" (LoRA rank's parameters); None: the form's
    rank: int = 16
    oft_r: int = 4
    atoms: dict[str, Any] = field(default_factory=dict)  # further AtomConfig fields
    atom_budget: int = DEFAULT_ATOM_BUDGET  # atoms kept per module after training; 0 keeps all
    form: str = DEFAULT_FORM  # atoms on the LoRA projections, or the paper's attention update

    def __post_init__(self) -> None:
        check_method(self.method)
        if self.form not in FORMS:
            raise AtomtuneError(f"form must be one of {', '.join(FORMS)}; got {self.form!r}")
        if self.num_atoms is None:
            self.num_atoms = DEFAULT_NUM_ATOMS[self.form]
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
        if "mode" in self.atoms:
            raise AtomtuneError("set the atoms' form (projections or attention) with form, not atoms.mode")
        reserved = sorted(set(self.atoms) & {"num_atoms", "atom_budget", "base_model_name_or_path"})
        if reserved:
            raise AtomtuneError(f"set {reserved[0]} through its own option, not in the atoms settings")
        if self.method == "atoms":
            self._atom_config(None, 1 if self.num_atoms == PARITY else self.num_atoms)  # validate early

    def resolved(self, model: nn.Module, target_modules: tuple[str, ...] | None = None) -> MethodConfig:
        """This config with ``num_atoms="parity"`` replaced by the count for ``model``: the atoms per
        module whose parameters come nearest LoRA rank ``rank`` on ``target_modules`` (the host's
        LoRA targets; default PixArt's) without exceeding them in the projections form."""
        if self.num_atoms != PARITY:
            return self
        targets = list(target_modules or TARGET_MODULES)
        shape_only = self._atom_config(None, 1, target_modules)  # which modules, their widths
        count = parity_atoms(model, shape_only, targets, self.rank)
        return replace(self, num_atoms=count)

    def atom_config(
        self, base: str | None = None, target_modules: tuple[str, ...] | None = None
    ) -> AtomConfig:
        """The core's config; the projections form adapts ``target_modules`` (the host's LoRA
        targets; default PixArt's) unless the atoms settings name their own."""
        if self.num_atoms == PARITY:
            raise AtomtuneError("num_atoms='parity' is a count for a model: resolve it first (resolved())")
        return self._atom_config(base, self.num_atoms, target_modules)

    def _atom_config(
        self, base: str | None, num_atoms: int, target_modules: tuple[str, ...] | None = None
    ) -> AtomConfig:
        budget = self.atom_budget if 0 < self.atom_budget < num_atoms else None
        form: dict[str, Any] = {"mode": "attention"}
        if self.form == "projections":
            form = {"mode": "linear", "target_modules": list(target_modules or TARGET_MODULES)}
        return AtomConfig.from_dict(
            {
                "num_atoms": num_atoms,
                "atom_budget": budget,
                **form,
                **self.atoms,
                "mode": form["mode"],
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
            c = self._atom_config(None, 1 if parity else self.num_atoms, target_modules)
            count = f"LoRA rank {self.rank}'s parameter count in atoms" if parity else c.num_atoms
            budget = self.atom_budget if parity else c.atom_budget
            kept = f", cut to {budget} by contribution" if budget else ""
            if self.form == "projections":
                targets = c.target_modules
                where = f"per projection on {targets if isinstance(targets, str) else ', '.join(targets)}"
            else:
                where = f"per attention module ({c.attention}-attention, {c.placement})"
            return (
                f"atoms: {count} {where}{kept}, shrinkage {c.shrinkage}, L1 weight "
                f"{c.sparsity_weight}, orthogonality weight {c.orthogonality_weight}"
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
        atom_config = config.atom_config(pretrained, target_modules)
        tuned: Tuned = AtomTuned(AtomModel(model, atom_config, name), pretrained)
        tuned.target_modules = target_modules  # what the card names (the projections form adapts them)
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
