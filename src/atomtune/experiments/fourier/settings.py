"""The toy's settings: one dataclass with every knob, so a run is named by its settings and seed.

The defaults are the paper's where it gives one (supplementary C.1); where it gives none, the comment
next to the field says how the value was picked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from atomtune.errors import AtomtuneError

KINDS = ("dense", "sparse")
LAYOUTS = ("positions", "lifted")


@dataclass
class FourierSettings:
    """Every knob of the toy; the defaults are the paper's setting where it gives one (supplementary C.1)."""

    seed: int = 0
    # data
    seq_len: int = 64  # samples per signal
    max_freq: int = 24  # frequencies 0/64 … max_freq/64
    n_bases: int = 5  # cosines per signal
    shared_bases: bool = True  # one set of n_bases frequencies per seed (see the module docstring)
    amplitude_min: float = 0.5
    amplitude_max: float = 1.0
    observed: int = 16  # samples kept; the other seq_len − observed are masked
    train_signals: int = 8192
    eval_signals: int = 512
    # model
    layout: str = "positions"  # or "lifted" (the earlier layout: the lifted dims as tokens; see docstring)
    lift_dim: int = 64  # the frozen lift 1-D → lift_dim (the number of tokens in the "lifted" layout)
    # "positions" only: attention layers before the block (see the docstring); of 2 (+ GELU MLP) to 4
    # at equal time, and 1, 2, 4 or 8 heads, 3 layers of 2 heads had the lowest error (seeds 7, 11).
    mixing_layers: int = 3
    mixing_heads: int = 2
    mixing_mlp: int = 0  # "positions" only: hidden units of each mixing layer's GELU MLP / width (0: none)
    position_products: bool = True  # "positions" only: tokens also carry m_t·PE(t) and x_t·m_t·PE(t)
    feature_dim: int = 128  # block width: q, k, and the input of W_v and W_s
    block_heads: int = 1  # attention heads of the block itself (see FourierBlock.coefficients)
    qk_init_std: float = 0.088  # the block's W_q, W_k at init: 1/√128 (0.02, uniform attention, in "lifted")
    num_atoms: int = 128  # atoms of the sparse block (the dense block has feature_dim rows in W_v)
    shrinkage: str = "soft"  # "soft", "relu" or "topk" (atomtune.core.shrinkage)
    topk: int = 8  # only for shrinkage="topk"
    lambda_init: float = 1e-3
    lambda_lr_scale: float = 0.1  # λ's learning rate relative to the block's (see train_block)
    # training (same signals, steps and batch for both blocks)
    steps: int = 1000  # "lifted": 6000 (see for_layout); here ~1 minute per block on one thread
    batch_size: int = 32
    # Each block's learning rate. "positions": 3e-3 (1e-2 diverged even with clipping, 5e-3 no better).
    # "lifted": of {3e-3, 1e-2}, the one with the lower masked error (3000 steps, seeds 0-2); the dense
    # block at 1e-2 failed to train on seed 2.
    lr_dense: float = 3e-3
    lr_sparse: float = 3e-3
    # Weight of mean |S| over signals, tokens and atoms, picked by hand from {5, 15, 30, 60} (3000 steps):
    # 5 leaves ~100 atoms per signal, 60 cost up to 40% more masked error than the dense block.
    sparsity_weight: float = 30.0
    sparsity_warmup: float = 0.3  # the L1 weight ramps up from 0 over this fraction of the steps
    masked_loss: bool = False  # train on the masked samples' error only (tried: worse, 0.13 against 0.05)
    # Clip the gradient's norm to this (0: no clipping). "positions": without it, training at 3e-3 blew
    # up (loss 3.6 after 200 steps) and stopped at or above the linear map's error.
    grad_clip: float = 1.0
    orthogonality_weight: float = 0.0  # METHOD.md's atom penalty; no measurable effect here
    # measures
    tolerance: float = 0.05
    fourier_share: float = 0.9

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise AtomtuneError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "positions" and self.feature_dim % self.mixing_heads:
            raise AtomtuneError("mixing_heads must divide feature_dim")
        if self.feature_dim % self.block_heads or self.num_atoms % self.block_heads:
            raise AtomtuneError("block_heads must divide feature_dim and num_atoms")

    @classmethod
    def for_layout(cls, seed: int = 0, layout: str = "positions") -> FourierSettings:
        """The defaults of a layout; "lifted" keeps the settings it was measured with."""
        if layout == "lifted":
            return cls(seed=seed, layout=layout, steps=6000, lr_sparse=1e-2, grad_clip=0.0, qk_init_std=0.02)
        return cls(seed=seed, layout=layout)

    @classmethod
    def fast(cls, seed: int = 0, layout: str = "positions") -> FourierSettings:
        """The tests' and ``--fast``'s setting: fewer steps, 128 held-out signals (seconds, not minutes)."""
        if layout == "lifted":
            return cls.for_layout(seed, layout).replace(steps=1500, eval_signals=128)
        # Width 64 at twice the learning rate: at width 128, 400-500 steps stop at the linear map's error;
        # this setting beats it within about a minute of CPU (seed 0: dense 0.19, sparse 0.10, map 0.31).
        return cls.for_layout(seed, layout).replace(
            steps=600, feature_dim=64, lr_dense=6e-3, lr_sparse=6e-3, eval_signals=128
        )

    def replace(self, **changes: Any) -> FourierSettings:
        return replace(self, **changes)
