"""The adapter layers: a dictionary of atoms per adapted module, and the two ways to use it.

``Atoms`` holds one adapter's parameters for one module: the coefficient encoder ``W_s`` (C_in x M),
the atoms ``D`` (M x C_out), the thresholds λ (M), and two buffers that steer inference without
touching the trained parameters: ``mask`` (0/1 per atom) and ``gain`` (a scale per atom).
``atom_ids`` remembers each atom's original index, so that "atom 137" keeps its name after pruning.

``AtomLayer`` holds the named adapters of one module, one of them active. ``AtomLinear`` adds
``ΔY = σ_λ(X·W_s)·D`` to a linear layer's output; ``AtomAttention`` supplies the pieces an attention
processor needs for ``ΔO = σ_λ(concat_h A_h·Xc·W_s^h)·D`` (see ``hosts.diffusers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.losses import l1_sparsity
from atomtune.core.shrinkage import shrink
from atomtune.errors import AtomtuneError

Listener = Callable[["AtomLayer", torch.Tensor], None]


class Atoms(nn.Module):
    """One adapter's feature dictionary for one module."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_atoms: int,
        config: AtomConfig,
        fan_in: int | None = None,
    ) -> None:
        """``fan_in``: inputs each token is encoded from, for ``W_s``'s initial scale (fewer than
        ``in_features`` when ``W_s`` stacks one block per stream)."""
        super().__init__()
        self.shrinkage = config.shrinkage
        self.topk = config.topk
        self.placement = config.placement
        self.fused = config.fused
        std = config.init_scale / math.sqrt(fan_in or in_features)
        self.W_s = nn.Parameter(torch.randn(in_features, num_atoms) * std)
        self.D = nn.Parameter(torch.zeros(num_atoms, out_features))
        self.lam = nn.Parameter(torch.full((num_atoms,), float(config.lambda_init)))
        self.lam.requires_grad_(config.learn_lambda)
        self.register_buffer("mask", torch.ones(num_atoms))
        self.register_buffer("gain", torch.ones(num_atoms))
        self.register_buffer("atom_ids", torch.arange(num_atoms))

    @property
    def num_atoms(self) -> int:
        return self.D.shape[0]

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """σ_λ(z) with λ kept non-negative as |λ|.

        Under top-k, masked atoms are taken out of the competition first, so that masking an atom
        is the same as removing it (and ``prune`` keeps the outputs) for every shrinkage.
        """
        if self.shrinkage == "topk":
            z = z * (self.mask != 0).to(z.dtype)
        return shrink(z, self.shrinkage, lam=self.lam.abs().to(z.dtype), k=self.topk)

    def steered_atoms(self) -> torch.Tensor:
        """``D`` with each row scaled by mask·gain: masking atom m equals dropping row m of ``D``.

        Recomputed every call (three small kernels): a cache keyed on tensor versions would miss
        in-place edits made through ``.data``, and serve a stale dictionary.
        """
        return self.D * (self.mask * self.gain).to(self.D.dtype)[:, None]

    def decode(self, s: torch.Tensor) -> torch.Tensor:
        return s.to(self.D.dtype) @ self.steered_atoms()

    def extra_repr(self) -> str:
        return f"in={self.W_s.shape[0]}, atoms={self.num_atoms}, out={self.D.shape[1]}, shrinkage={self.shrinkage}"


class AtomLayer(nn.Module):
    """The named adapters of one module; at most one active."""

    kind = "base"
    even_heads = True  # atoms split evenly over the heads; attention processors that pad may clear it

    def __init__(self, in_features: int, heads: int = 1) -> None:
        super().__init__()
        self.in_features = in_features
        self.fan_in = in_features
        self.heads = heads
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.listeners: list[Listener] = []
        self.last_sparsity: torch.Tensor | None = None
        self.last_activity: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def add_adapter(
        self,
        name: str,
        config: AtomConfig,
        out_features: int,
        like: torch.Tensor,
        num_atoms: int | None = None,
    ) -> Atoms:
        """Add ``Atoms`` on ``like``'s device. Adapters train in float32 even on a half-precision host
        (PEFT's choice too); a float64 host keeps float64 so exactness tests can hold it to 1e-10."""
        num_atoms = config.num_atoms if num_atoms is None else num_atoms
        if num_atoms % self.heads and self.even_heads:
            raise AtomtuneError(
                f"num_atoms={num_atoms} must be a multiple of the {self.heads} attention heads "
                f"(atoms are split evenly over the heads)"
            )
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        atoms = Atoms(self.in_features, out_features, num_atoms, config, self.fan_in)
        # made under an empty-weights context (PEFT's low_cpu_mem_usage), it stays on meta until loaded
        atoms = atoms.to(dtype=dtype) if atoms.W_s.is_meta else atoms.to(like.device, dtype)
        self.adapters[name] = atoms
        return atoms

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def active(self) -> Atoms | None:
        """The active adapter's atoms, or None when disabled or none is active."""
        if self.disabled or self.active_adapter is None:
            return None
        return self.adapters[self.active_adapter]

    def code(self, atoms: Atoms, z: torch.Tensor) -> torch.Tensor:
        """Shrink ``z`` (..., M) into sparse coefficients and report them to listeners."""
        s = atoms.coefficients(z)
        if torch.is_grad_enabled() and atoms.W_s.requires_grad:
            self.last_sparsity = l1_sparsity(s)
            live = atoms.mask != 0  # atoms cut by a budget do not count as active
            nonzero = ((s.detach() != 0) & live).sum()
            self.last_activity = (nonzero, s[..., 0].numel(), live.sum())  # tensors: no sync here
        for listener in self.listeners:
            listener(self, s.detach())
        return s


class AtomLinear(AtomLayer):
    """Linear mode: ``ΔY = σ_λ(X·W_s)·D``, added to the wrapped layer's output by a forward hook."""

    kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        atoms = self.active
        return None if atoms is None else self.delta(atoms, x)

    def delta(self, atoms: Atoms, x: torch.Tensor) -> torch.Tensor:
        """``σ_λ(X·W_s)·D`` of ``atoms`` for the input ``x``: the one formula both ``AtomModel``'s hook
        and PEFT's layer (``atomtune.peft``) add to the wrapped layer's output."""
        z = x.to(atoms.W_s.dtype) @ atoms.W_s
        return atoms.decode(self.code(atoms, z)).to(x.dtype)


class AtomAttention(AtomLayer):
    """Attention mode: per-head coefficient channels ``Xc·W_s^h`` and the update from their mix.

    Atom ``j`` belongs to head ``j // ceil(M/H)``. When ``M`` does not divide over the heads (Sana's
    70 heads) the last heads get fewer atoms: their spare channels are zero and dropped again.

    ``in_features`` is the context width (``Xc``); each adapter's ``D`` is as wide as the space
    ``ΔO`` lives in: the value space for ``pre_out``, the block output for ``post_out``.
    """

    kind = "attention"

    def channels(self, atoms: Atoms, context: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``Xc·W_s`` split over heads: (B, L, C) → (B, H, L, M/H).

        On a half-precision host the small ``W_s`` is cast down rather than the large context up:
        the channels ride with the values in the host's attention call anyway. ``rows``: the block
        of ``W_s`` this context is encoded with (a per-stream encoder in joint attention).
        """
        w_s = atoms.W_s if rows is None else atoms.W_s[rows]
        if context.dtype in (torch.float16, torch.bfloat16):
            c = context @ w_s.to(context.dtype)
        else:
            c = context.to(w_s.dtype) @ w_s
        b, n, m = c.shape
        per_head = -(-m // self.heads)
        if per_head * self.heads != m:  # uneven split: the last heads carry zero channels
            c = torch.nn.functional.pad(c, (0, per_head * self.heads - m))
        return c.view(b, n, self.heads, per_head).transpose(1, 2)

    def update(self, atoms: Atoms, mixed: torch.Tensor) -> torch.Tensor:
        """Attention-mixed channels (B, H, N, M/H) → ``ΔO = σ_λ(concat_h ·)·D`` of shape (B, N, C_out)."""
        b, h, n, m = mixed.shape
        z = mixed.transpose(1, 2).reshape(b, n, h * m)
        if h * m != atoms.num_atoms:
            z = z[..., : atoms.num_atoms]  # drop the padding channels of an uneven split
        return atoms.decode(self.code(atoms, z.to(atoms.W_s.dtype)))
