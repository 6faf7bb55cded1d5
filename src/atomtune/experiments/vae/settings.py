"""The VAE experiment's settings: one dataclass with every knob, checked before anything runs.

The model's shape and the optimiser are the paper's (supplementary B); the rest says how long each
stage trains and how much is measured, so ``fast`` can shorten a run without changing what it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from atomtune.errors import AtomtuneError

IMAGE = 28


@dataclass
class VaeSettings:
    """Every knob of the experiment; the model's shape and optimiser are the paper's (supplementary B)."""

    seed: int = 0
    data: str = "digits"  # "digits" (scikit-learn's, bundled) or "mnist-idx"
    mnist_dir: str | None = None
    old_digit: int = 8
    new_digit: int = 3
    images_per_class: int | None = None  # cap per class before the split (None: all)
    # model (section B)
    width: int = 128
    heads: int = 4
    layers: int = 2  # per encoder and per decoder
    patch: int = 7
    latent: int = 32
    mlp_ratio: int = 2
    # training: Adam at the paper's 1e-3 for pretraining and both fine-tunes
    lr: float = 1e-3
    batch_size: int = 64
    pretrain_steps: int = 1200
    finetune_steps: int = 400
    # atoms: the core's AtomConfig defaults but for these
    form: str = "projections"  # atoms on LoRA's four projections per attention module, or "attention"
    num_atoms: int = 8  # per projection: 8·257 = 2056 parameters, LoRA r8's 2048 (per module: x 4)
    sparsity_weight: float | None = None  # None: AtomConfig's default
    lambda_init: float | None = None
    # The core's dense-then-prune recipe: a second atoms fine-tune, num_atoms cut to this many per
    # projection during training (AtomConfig.atom_budget); None skips it. 2 atoms cost 2·257 = 514
    # parameters per projection, LoRA of rank 2 on it 512 (budget_lora_rank).
    atom_budget: int | None = 2
    # LoRA at the same budget
    lora_rank: int = 8
    budget_lora_rank: int | None = 2  # LoRA at the pruned atoms' budget; None skips it
    # judge
    judge_steps: int = 400
    # measures
    samples: int = 256  # prior samples judged per model
    share: float = 0.9  # contribution share whose atoms are counted
    top_removed: int = 3  # top atoms (LoRA components) removed one at a time, per decoder layer
    figure_samples: int = 8

    @classmethod
    def fast(cls, seed: int = 0) -> VaeSettings:
        """The tests' and ``--fast``'s setting: short runs, fewer samples (seconds, not minutes)."""
        return cls(
            seed=seed, pretrain_steps=250, finetune_steps=120, judge_steps=150, samples=64, top_removed=1
        )

    def replace(self, **changes: Any) -> VaeSettings:
        return replace(self, **changes)

    def validate(self) -> None:
        if self.data not in ("digits", "mnist-idx"):
            raise AtomtuneError(f"data must be 'digits' or 'mnist-idx', got {self.data!r}")
        for name in ("old_digit", "new_digit"):
            if not 0 <= getattr(self, name) <= 9:
                raise AtomtuneError(f"{name} must be a digit 0-9, got {getattr(self, name)}")
        if self.images_per_class is not None and self.images_per_class < 5:
            raise AtomtuneError(f"images_per_class must be >= 5, got {self.images_per_class}")
        if self.old_digit == self.new_digit:
            raise AtomtuneError("old and new digit must differ")
        if self.form not in ("projections", "attention"):
            raise AtomtuneError(f"form must be 'projections' or 'attention', got {self.form!r}")
        if IMAGE % self.patch or self.width % self.heads:
            raise AtomtuneError("patch must divide 28, and heads must divide width")
        if self.form == "attention" and self.num_atoms % self.heads:
            raise AtomtuneError(
                f"attention atoms split over the heads: num_atoms must be a multiple of {self.heads}"
            )
        for name in ("pretrain_steps", "finetune_steps", "judge_steps", "samples", "lora_rank", "batch_size"):
            if getattr(self, name) < 1:
                raise AtomtuneError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("atom_budget", "budget_lora_rank"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise AtomtuneError(f"{name} must be a positive integer or None, got {value!r}")
        if self.atom_budget is not None and self.atom_budget >= self.num_atoms:
            raise AtomtuneError(
                f"atom_budget must be below num_atoms ({self.num_atoms}), got {self.atom_budget}"
            )
