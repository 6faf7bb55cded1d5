"""``AtomConfig``: what to adapt and how, in the shape PEFT users know from ``LoraConfig``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomtune.core.shrinkage import SHRINKAGES
from atomtune.errors import AtomtuneError

MODES = ("attention", "linear")
PLACEMENTS = ("pre_out", "post_out")
ATTENTION_KINDS = ("self", "cross", "joint", "both")
JOINT_ENCODERS = ("shared", "per_stream")
PRUNE_BY = ("contribution", "random")


@dataclass
class AtomConfig:
    """Settings of one atom adapter.

    Attention mode adapts attention modules: ``ΔO = σ_λ(concat_h A_h·Xc·W_s^h)·D``.
    Linear mode adapts ``nn.Linear`` (and GPT-2's ``Conv1D``) layers: ``ΔY = σ_λ(X·W_s)·D``.

    Args:
        mode: ``"attention"`` (diffusers ``Attention`` modules) or ``"linear"``.
        num_atoms: atoms ``M`` per adapted module; in attention mode split evenly over the heads,
            so it must be a multiple of the head count.
        shrinkage: ``"soft"`` (sign(z)·max(|z|−λ, 0)), ``"relu"`` (max(z−λ, 0)) or ``"topk"``.
        topk: atoms kept per token with ``shrinkage="topk"``.
        lambda_init: initial threshold λ, per atom. Small, so that coefficients start non-zero
            and gradients flow; the L1 penalty then raises it where the data allow.
        learn_lambda: learn λ (kept non-negative as ``|λ|``) or keep it fixed.
        placement: attention mode only. ``"pre_out"`` adds ``ΔO`` in the value space before the
            output projection (the paper's form); ``"post_out"`` adds it after.
        attention: attention mode only: adapt ``"self"``-, ``"cross"``- or ``"joint"`` attention (text and
            image tokens attending together: SD3, Flux), or ``"both"``: every attention module.
        joint_encoder: joint attention only: one coefficient encoder ``W_s`` shared by the text and
            image tokens (``"shared"``), or one per stream (``"per_stream"``, stacked in ``W_s``'s rows:
            image rows, then text rows), mirroring the host's separate value projections.
        target_modules: regular expression (``re.search``) on module names, or a list of them;
            ``None`` means every module of the mode's kind. Required in linear mode.
        layers: only modules whose first index in their name (``transformer_blocks.3.…`` → 3)
            is in this list; ``None`` means all.
        fused: compute the coefficients in the same attention call as the values (widened value
            heads) rather than a second call. Same result, one kernel launch.
        init_scale: ``W_s`` starts as N(0, (init_scale / √fan_in)²); ``D`` starts at zero, so the
            adapted model equals the pretrained one at step 0.
        sparsity_weight: weight of the L1 penalty on the coefficients in ``regularization_loss``.
        orthogonality_weight: weight of the penalty on off-diagonal ``D̂·D̂ᵀ`` (normalised atoms).
        atom_budget: atoms kept per module at the end of training (``None``: all). Training keeps
            the atoms of largest contribution at the cuts ``prune_at`` (see ``budget``), and the
            adapter is pruned to this size once training ends.
        prune_at: fractions of training at which atoms are cut, geometrically from ``num_atoms``
            down to ``atom_budget`` (the last cut reaches it).
        lr_exponent: after a cut leaving ``k`` atoms, the learning rate is raised by
            ``(num_atoms / k) ** lr_exponent`` (0: unchanged).
        prune_by: ``"contribution"`` (keep the atoms with the largest ``E|s|·‖d‖``) or
            ``"random"`` (the control: as many atoms, drawn at random).
    """

    mode: str = "attention"
    num_atoms: int = 64
    shrinkage: str = "soft"
    topk: int = 16
    lambda_init: float = 1e-3
    learn_lambda: bool = True
    placement: str = "pre_out"
    attention: str = "both"
    joint_encoder: str = "shared"
    target_modules: str | list[str] | None = None
    layers: list[int] | None = None
    fused: bool = True
    init_scale: float = 1.0
    sparsity_weight: float = 1e-3
    orthogonality_weight: float = 1e-2
    atom_budget: int | None = None
    prune_at: list[float] = field(default_factory=lambda: [0.25, 0.5])
    lr_exponent: float = 0.5
    prune_by: str = "contribution"
    base_model_name_or_path: str | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``AtomtuneError`` naming the first setting out of range."""
        _choice("mode", self.mode, MODES)
        _choice("shrinkage", self.shrinkage, SHRINKAGES)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("attention", self.attention, ATTENTION_KINDS)
        _choice("joint_encoder", self.joint_encoder, JOINT_ENCODERS)
        if not isinstance(self.num_atoms, int) or isinstance(self.num_atoms, bool) or self.num_atoms < 1:
            raise AtomtuneError(f"num_atoms must be a positive integer, got {self.num_atoms!r}")
        if self.shrinkage == "topk" and not (isinstance(self.topk, int) and self.topk >= 1):
            raise AtomtuneError(f"topk must be a positive integer, got {self.topk!r}")
        _check_fields_types(self)
        _choice("prune_by", self.prune_by, PRUNE_BY)
        if self.atom_budget is not None and (
            not isinstance(self.atom_budget, int)
            or isinstance(self.atom_budget, bool)
            or self.atom_budget < 1
        ):
            raise AtomtuneError(f"atom_budget must be a positive integer or None, got {self.atom_budget!r}")
        self.prune_at = list(self.prune_at)
        if (
            not self.prune_at
            or any(not isinstance(f, (int, float)) or not 0 < f <= 1 for f in self.prune_at)
            or self.prune_at != sorted(self.prune_at)
        ):
            raise AtomtuneError(f"prune_at must be increasing fractions in (0, 1], got {self.prune_at!r}")
        if not isinstance(self.lr_exponent, (int, float)) or not 0 <= self.lr_exponent <= 2:
            raise AtomtuneError(f"lr_exponent must be in [0, 2], got {self.lr_exponent!r}")
        if self.mode == "linear" and self.target_modules is None:
            raise AtomtuneError("linear mode needs target_modules (a regex on module names)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AtomConfig:
        """Build from a dict, refusing unknown fields (a typo must not silently become a default)."""
        if not isinstance(data, dict):
            raise AtomtuneError(f"an AtomConfig must be an object of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AtomtuneError(f"unknown AtomConfig field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise AtomtuneError(f"invalid AtomConfig: {exc}") from exc

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_fields_types(config: AtomConfig) -> None:
    """Numbers finite and in range, flags true/false, names strings: a settings file or an
    ``adapter_config.json`` can hold anything."""
    from atomtune.validation import check_number, check_type

    for name in ("lambda_init", "sparsity_weight", "orthogonality_weight", "init_scale"):
        check_number(name, getattr(config, name), minimum=0)
    check_number("topk", config.topk, integer=True, minimum=1)
    for name in ("learn_lambda", "fused"):
        check_type(name, getattr(config, name), bool, "true or false")
    target = config.target_modules
    if not (target is None or isinstance(target, str) or _all(target, str)):
        raise AtomtuneError(f"target_modules must be a regex or a list of them, got {target!r}")
    if not (config.layers is None or _all(config.layers, int)):
        raise AtomtuneError(f"layers must be a list of integers, got {config.layers!r}")
    check_type("base_model_name_or_path", config.base_model_name_or_path, (str, type(None)), "a string")


def _all(values: Any, kind: type) -> bool:
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise AtomtuneError(f"{name} must be one of {', '.join(options)}; got {value!r}")
