"""``AtomsPeftConfig``: linear-mode atoms in PEFT's config shape (``LoraConfig``'s neighbour)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from atomtune.core.config import AtomConfig
from atomtune.errors import AtomtuneError

# the AtomConfig fields that apply to atoms on linear layers, with AtomConfig's own defaults
METHOD_FIELDS = (
    "num_atoms",
    "shrinkage",
    "topk",
    "lambda_init",
    "learn_lambda",
    "init_scale",
    "sparsity_weight",
    "orthogonality_weight",
    "atom_budget",
    "prune_at",
    "lr_exponent",
    "prune_by",
)
_ATOM_FIELDS = {f.name: f for f in dataclasses.fields(AtomConfig)}


def _like(name: str, help: str) -> Any:
    return field(default=_ATOM_FIELDS[name].default, metadata={"help": help})


@dataclass
class AtomsPeftConfig(PeftConfig):
    """Atoms on ``nn.Linear`` (and GPT-2's ``Conv1D``) layers: ``ΔY = σ_λ(X·W_s)·D`` added to each
    adapted layer's output, as ``AtomConfig(mode="linear")`` but placed by PEFT.

    ``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` select
    modules as in ``LoraConfig`` (a string is a regex matched against the whole name; a list holds
    names or name suffixes). ``atoms_pattern`` gives the modules whose dictionary is not
    ``num_atoms`` atoms (what ``prune`` leaves) by their name in the base model; ``prune`` on
    ``atoms_of(model)`` fills it, so ``save_pretrained`` / ``from_pretrained`` rebuild the pruned sizes.
    The method's other fields mean what they mean in ``AtomConfig`` (same defaults).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Names or name suffixes (or one regex) of the linear layers to adapt."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or name suffixes (or one regex) of modules not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only these layer indices (as in LoraConfig)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "The name of the layer list that layers_to_transform indexes."}
    )
    atoms_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Module name -> atoms where it is not num_atoms (pruned)."}
    )
    num_atoms: int = _like("num_atoms", "Atoms M per adapted layer.")
    shrinkage: str = _like("shrinkage", "soft, relu or topk.")
    topk: int = _like("topk", "Atoms kept per token with shrinkage='topk'.")
    lambda_init: float = _like("lambda_init", "Initial threshold λ per atom.")
    learn_lambda: bool = _like("learn_lambda", "Learn λ (kept non-negative as |λ|).")
    init_scale: float = _like("init_scale", "W_s starts as N(0, (init_scale/√fan_in)²); D at zero.")
    sparsity_weight: float = _like("sparsity_weight", "Weight of the L1 penalty on the coefficients.")
    orthogonality_weight: float = _like("orthogonality_weight", "Weight of the atoms' orthogonality penalty.")
    atom_budget: int | None = _like("atom_budget", "Atoms kept per module at the end of training.")
    prune_at: list[float] = field(
        default_factory=_ATOM_FIELDS["prune_at"].default_factory,
        metadata={"help": "Fractions of training at which the budget cuts atoms."},
    )
    lr_exponent: float = _like("lr_exponent", "Learning-rate raise after a cut: (M/kept)**lr_exponent.")
    prune_by: str = _like("prune_by", "contribution or random.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ATOMS
        if self.target_modules is None:
            raise AtomtuneError(
                "AtomsPeftConfig needs target_modules (layer names or a regex, as in LoraConfig)"
            )
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), list):  # PEFT's own configs hold sets
                setattr(self, name, set(getattr(self, name)))
        pattern = self.atoms_pattern
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 1 for k, v in pattern.items()
        ):
            raise AtomtuneError(
                f"atoms_pattern must map module names to positive atom counts, got {pattern!r}"
            )
        self.to_atom_config()  # AtomConfig's checks: each field's type and range

    def to_atom_config(self, target_modules: list[str] | None = None) -> AtomConfig:
        """The same adapter as an ``AtomConfig`` (linear mode), on ``target_modules`` (module names;
        default: this config's targets, a regex anchored at both ends as PEFT matches it)."""
        if target_modules is None:
            target = self.target_modules
            target_modules = f"^(?:{target})$" if isinstance(target, str) else sorted(target)
        return AtomConfig(
            mode="linear",
            target_modules=target_modules,
            base_model_name_or_path=self.base_model_name_or_path,
            **{name: getattr(self, name) for name in METHOD_FIELDS},
        )

    @classmethod
    def from_atom_config(
        cls, config: AtomConfig, target_modules: list[str], atoms_pattern: dict[str, int] | None = None
    ) -> AtomsPeftConfig:
        """The PEFT config of an ``AtomConfig`` adapter on the named modules (linear mode only: PEFT
        wraps layers, while attention-mode atoms live inside the attention processors)."""
        if config.mode != "linear":
            raise AtomtuneError(
                f"PEFT's atoms adapt linear layers (mode='linear'); this adapter is in {config.mode} "
                f"mode: use AtomModel for it"
            )
        return cls(
            target_modules=list(target_modules),
            atoms_pattern=dict(atoms_pattern or {}),
            base_model_name_or_path=config.base_model_name_or_path,
            **{name: getattr(config, name) for name in METHOD_FIELDS},
        )
