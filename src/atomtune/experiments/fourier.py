"""The paper's toy experiment (supplementary C.1, Figure 9): masked Fourier signals, sparse against dense.

Claim under test: an attention block ``O = σ_λ(A·X·W_s)·D`` reconstructs masked signals from few
atoms (the paper: 9), whereas ``O = A·X·W_v`` needs many (the paper: 100), and the sparse block's
atoms resemble the Fourier bases that generated the data.

Data. A signal has ``seq_len`` = 64 samples and is a sum of ``n_bases`` = 5 cosines with integer
frequencies in ``[0, max_freq]`` (0/64 … 24/64), each with a random amplitude and phase. By default
the 5 frequencies are drawn once per seed and shared by every signal (``shared_bases``): the paper
says the atoms resemble "the ones used to synthesize" the data and that the block reconstructs the
signals; with 16 observations, only a fixed small set of bases makes that possible (5 frequencies with
free phases span at most 10 dimensions). ``shared_bases=False`` draws 5 frequencies per signal, a
49-dimensional family that 16 samples cannot pin down: there even the best linear estimator barely
beats predicting zero. Of the 64 samples, ``observed`` = 16 random ones are kept, the rest masked.

Two layouts of the tokens (``layout``). Both lift the 1-D signal by a frozen random vector ``p``
(``lift_dim`` = 64 entries) and bring the output back to 1-D by summing over the 64 lifted dims.

- ``"positions"`` (default; the paper's: sequence length 64 = the samples, feature dimension 128).
  Token t holds ``x_t·m_t·p`` (its observed value lifted to 64 dims, 0 where masked), its
  observation flag ``m_t``, and a 63-d sinusoidal position code (cos and sin of 2π·k·t/64 for
  k = 1 … 31, and cos(π·t)): 128 raw features, mapped by a learned ``W_in`` to width 128. One
  attention layer on these tokens is close to a fixed kernel over the observations (measured: masked
  NMSE 0.27 at 1500 steps, little better than the best linear map), and recovering the signal
  needs the least-squares fit of 10 coefficients to the 16 observations, which depends on where they
  fall; so ``mixing_layers`` = 2 pre-norm attention layers (4 heads, residual, no MLP) come first,
  trained with the block (our addition; measured 0.035 at 1500 steps with a dense 4-head read-out).
  The block's output per token is 64 lifted values, summed into that sample; an atom is a vector
  in the lifted space, so its shape over the samples is its contribution curve ``S_{t,m}·Σ_j d_{m,j}``.
- ``"lifted"`` (the earlier layout): the 64 lifted dims are the tokens, each carrying its copy of
  the masked signal over the 64 positions and the 64 mask flags; atoms are 64-sample curves. Every
  token holds a scaled copy of the same signal, so attention can do little more than a linear map.

The two blocks, trained on the same signals for the same number of steps and batch size:

- dense:  ``O = A·X·W_v``, ``W_v`` (128 x 64), output ``y = Σ_tokens O``;
- sparse: ``O = σ_λ(A·X·W_s)·D``, ``W_s`` (128 x M), ``D`` (M x 64) with unit-norm rows (as in
  dictionary learning: otherwise the L1 penalty is dodged by shrinking codes and growing atoms),
  ``σ_λ`` the soft threshold with a learned λ ≥ 0 per atom, loss + ``sparsity_weight``·mean|S|.
  ``A·X·W_s`` is computed by ``atomtune.core.functional.attention_with_atoms`` (the core's kernel), the
  shrinkage by ``atomtune.core.shrinkage.shrink``.

Atoms, one definition for both blocks: dense, atom m is row m of ``W_v`` (128 atoms) with
coefficients ``A·X``; sparse, row m of ``D`` (``num_atoms`` atoms) with ``σ_λ(A·X·W_s)``. Atom m's
contribution to a signal is a 64-sample curve ``c_m`` ("lifted": ``κ_m·d_m`` with ``κ = Σ_tokens S``;
"positions": ``S_{t,m}·Σ_j d_{m,j}`` over t), and ``Σ_m c_m`` is the block's output exactly.

- Atoms needed (``atoms_needed_mean``; per held-out signal, then averaged): rank the atoms by
  ``‖c_m‖``; the fewest top atoms whose partial sum is within ``tolerance`` = 5% of the block's own
  output over all 64 positions, ``‖y − Σ_top c‖ ≤ 5%·‖y‖``.
- Basis-free reference (``pca_atoms_needed_mean``): the same count with the atoms replaced by the principal
  directions of that block's held-out outputs. The dense count above is a count in the basis of its
  features, which a rotation of ``W_in`` and ``W_v`` changes without changing the output; this number
  says how many directions the outputs really need.
- Fourier-like atoms (``fourier_like_atoms``): among the atoms needed by at least one held-out
  signal (``atoms_used_by_any_signal``), those whose energy (``atom_spectra``: the atom's own
  spectrum, or in "positions" its contribution curves' spectra summed over held-out signals) at a
  single frequency (cosine and sine together) is at least ``fourier_share`` = 90% of their energy.
  Also reported: the share of those atoms' energy that lies at the generating frequencies.
- Error: ``masked_nmse`` = Σ (y − x)² / Σ x² over the masked positions of the held-out signals
  (1.0 = predicting zero). Reference ``linear_nmse``: a fixed linear map from the masked signal and
  mask to the signal, fitted by least squares on the training signals.

Measured in the "lifted" layout at its defaults (seeds 0, 1, 2; 512 held-out signals; 62-89 s each
on 2 CPU threads):
masked NMSE dense 0.31/0.34/0.35, sparse 0.34/0.41/0.40 (linear reference 0.32/0.35/0.35); atoms
needed dense 21.9/25.2/46.5, sparse 11.4/13.5/12.4, a ratio of 1.9-3.7, not the paper's 100/9 ≈ 11;
basis-free, the dense outputs need 8-9 directions and the sparse ones 12-18; no atom of either block
is Fourier-like, the sparse atoms mix the 5 generating frequencies (about 35% of their energy sits
there, 15% for a flat spectrum). The dense count also moves with training (with 3000 steps it was
65-78): it counts a basis, not a property of the output.

Results are written to ``fourier.json`` and ``fourier.png``, both atomically.
"""

from __future__ import annotations

import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atomtune.core.functional import attention_with_atoms
from atomtune.core.losses import l1_sparsity, orthogonality
from atomtune.core.shrinkage import shrink
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write
from atomtune.progress import progress_bar

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
    layout: str = "lifted"  # "lifted" or "positions" (the paper's: one token per sample; see docstring)
    lift_dim: int = 64  # the frozen lift 1-D → lift_dim (the number of tokens in the "lifted" layout)
    mixing_layers: int = 2  # "positions" only: attention layers before the block (see the docstring)
    mixing_heads: int = 4
    feature_dim: int = 128  # block width: q, k, and the input of W_v and W_s
    num_atoms: int = 128  # atoms of the sparse block (the dense block has feature_dim rows in W_v)
    shrinkage: str = "soft"  # "soft", "relu" or "topk" (atomtune.core.shrinkage)
    topk: int = 8  # only for shrinkage="topk"
    lambda_init: float = 1e-3
    lambda_lr_scale: float = 0.1  # λ's learning rate relative to the block's (see train_block)
    # training (same signals, steps and batch for both blocks)
    steps: int = 6000
    batch_size: int = 32
    # Each block's learning rate: of {3e-3, 1e-2}, the one with the lower masked error (3000 steps,
    # seeds 0-2); the dense block at 1e-2 failed to train on seed 2.
    lr_dense: float = 3e-3
    lr_sparse: float = 1e-2
    # Weight of mean |S| over signals, tokens and atoms, picked by hand from {5, 15, 30, 60} (3000 steps):
    # 5 leaves ~100 atoms per signal, 60 cost up to 40% more masked error than the dense block.
    sparsity_weight: float = 30.0
    sparsity_warmup: float = 0.3  # the L1 weight ramps up from 0 over this fraction of the steps
    orthogonality_weight: float = 0.0  # METHOD.md's atom penalty; no measurable effect here
    # measures
    tolerance: float = 0.05
    fourier_share: float = 0.9

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise AtomtuneError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "positions" and self.feature_dim % self.mixing_heads:
            raise AtomtuneError("mixing_heads must divide feature_dim")

    @classmethod
    def for_layout(cls, seed: int = 0, layout: str = "lifted") -> FourierSettings:
        """The defaults of a layout: "positions" trains 3 attention layers, so fewer steps at one rate."""
        if layout == "lifted":
            return cls(seed=seed, layout=layout)
        return cls(seed=seed, layout=layout, steps=1500, lr_dense=3e-3, lr_sparse=3e-3)

    @classmethod
    def fast(cls, seed: int = 0, layout: str = "lifted") -> FourierSettings:
        """The tests' and ``--fast``'s setting: fewer steps, 128 held-out signals (seconds, not minutes)."""
        steps = 1500 if layout == "lifted" else 500
        return cls.for_layout(seed, layout).replace(steps=steps, eval_signals=128)

    def replace(self, **changes: Any) -> FourierSettings:
        return replace(self, **changes)


# --------------------------------------------------------------------------------------------- data


def make_signals(
    settings: FourierSettings, n: int, generator: torch.Generator, bases: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` signals (n, T) and their masks (n, T; 1 = observed). ``bases``: shared frequencies or None."""
    s = settings
    if bases is None:
        freqs = torch.stack(
            [torch.randperm(s.max_freq + 1, generator=generator)[: s.n_bases] for _ in range(n)]
        )
    else:
        freqs = bases.expand(n, -1)
    amp = s.amplitude_min + (s.amplitude_max - s.amplitude_min) * torch.rand(
        n, s.n_bases, generator=generator
    )
    phase = 2 * math.pi * torch.rand(n, s.n_bases, generator=generator)
    t = torch.arange(s.seq_len, dtype=torch.float32)
    waves = torch.cos(2 * math.pi * freqs[..., None].float() * t / s.seq_len + phase[..., None])
    x = (amp[..., None] * waves).sum(1)
    keep = torch.rand(n, s.seq_len, generator=generator).argsort(dim=1)[:, : s.observed]
    mask = torch.zeros(n, s.seq_len).scatter_(1, keep, 1.0)
    return x, mask


# -------------------------------------------------------------------------------------------- model


def positional_encoding(seq_len: int) -> torch.Tensor:
    """(T, T − 1): cos and sin of 2π·k·t/T for k = 1 … T/2 − 1, and cos(π·t), per position t."""
    t = torch.arange(seq_len, dtype=torch.float32)[:, None]
    k = torch.arange(1, seq_len // 2, dtype=torch.float32)[None]
    angle = 2 * math.pi * k * t / seq_len
    return torch.cat([torch.cos(angle), torch.sin(angle), torch.cos(math.pi * t)], dim=1)


class MixingLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual connection (no MLP): the layers before the block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return x + self.out(mixed)


class FourierBlock(nn.Module):
    """One attention block, "dense" ``A·X·W_v`` or "sparse" ``σ_λ(A·X·W_s)·D``, summed over the lift.

    Layout "lifted": tokens are the lifted dims and the block's output is summed over tokens.
    Layout "positions": tokens are the samples, ``mixing_layers`` attention layers come first, and
    each token's output is summed over the lifted dims (the atoms' space) into one sample.
    """

    def __init__(self, kind: str, settings: FourierSettings, lift: torch.Tensor) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        s = settings
        s.validate()
        self.kind = kind
        self.settings = s
        c = s.feature_dim
        self.register_buffer("lift", lift)  # frozen: the paper's random projection
        if s.layout == "lifted":
            raw, out = 2 * s.seq_len, s.seq_len
            self.mixing = nn.ModuleList()
        else:
            raw, out = lift.shape[0] + s.seq_len, lift.shape[0]
            self.register_buffer("position", positional_encoding(s.seq_len))
            self.mixing = nn.ModuleList(MixingLayer(c, s.mixing_heads) for _ in range(s.mixing_layers))
        self.W_in = nn.Parameter(torch.randn(raw, c) / math.sqrt(raw))
        # Small q/k weights: attention starts uniform, so the sum over tokens starts as a plain average.
        self.W_q = nn.Parameter(torch.randn(c, c) * 0.02)
        self.W_k = nn.Parameter(torch.randn(c, c) * 0.02)
        if kind == "dense":
            self.W_v = nn.Parameter(torch.randn(c, out) * 0.1 / math.sqrt(c))
        else:
            self.W_s = nn.Parameter(torch.randn(c, s.num_atoms) / math.sqrt(c))
            self.D = nn.Parameter(torch.randn(s.num_atoms, out) / math.sqrt(out))
            self.lam = nn.Parameter(torch.full((s.num_atoms,), float(s.lambda_init)))

    @property
    def atoms(self) -> torch.Tensor:
        """(num atoms, output width): the rows of ``W_v``, or the unit-norm rows of ``D``."""
        if self.kind == "dense":
            return self.W_v
        return self.D / self.D.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def tokens(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) signal and mask → (B, tokens, feature_dim).

        "lifted": token j is ``[p_j·(x⊙mask), mask]·W_in`` (64 lifted dims as tokens).
        "positions": token t is ``[x_t·m_t·p, m_t, PE(t)]·W_in``: its observed value lifted to 64
        dims (0 where masked), its observation flag and a 63-d sinusoidal position code.
        """
        if self.settings.layout == "lifted":
            lifted = self.lift[None, :, None] * (x * mask)[:, None, :]
            flags = mask[:, None, :].expand(-1, self.lift.shape[0], -1)
            return torch.cat([lifted, flags], dim=-1) @ self.W_in
        lifted = (x * mask)[..., None] * self.lift
        position = self.position.expand(x.shape[0], -1, -1)
        h = torch.cat([lifted, mask[..., None], position], dim=-1) @ self.W_in
        for layer in self.mixing:
            h = layer(h)
        return h

    def attention_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``q, k, X`` as (B, 1, tokens, width): one head."""
        X = self.tokens(x, mask)[:, None]
        return X @ self.W_q, X @ self.W_k, X

    def coefficients(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token coefficients (B, tokens, atoms): ``A·X`` (dense) or ``σ_λ(A·X·W_s)`` (sparse)."""
        q, k, X = self.attention_inputs(x, mask)
        if self.kind == "dense":
            return F.scaled_dot_product_attention(q, k, X)[:, 0]
        # The core's kernel; two calls (fused=False) because on CPU the zero padding of the fused path
        # costs more than the second call at these sizes. Both paths are held equal by the core's tests.
        _, z = attention_with_atoms(q, k, X, X @ self.W_s, fused=False)
        return shrink(z[:, 0], self.settings.shrinkage, lam=self.lam.abs(), k=self.settings.topk)

    def contributions(self, S: torch.Tensor) -> torch.Tensor:
        """Each atom's contribution to each signal, (B, atoms, T); summed over atoms it is the output.

        "lifted": ``κ_m·d_m`` with ``κ = Σ_tokens S``. "positions": the curve ``S_{t,m}·Σ_j d_{m,j}``
        over the positions t (the atom's share of each sample, summed over the lifted dims).
        """
        if self.settings.layout == "lifted":
            return S.sum(1)[:, :, None] * self.atoms[None]
        return (S * self.atoms.sum(1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the output (B, T), the per-signal atom weights (B, atoms) and the coefficients.

        The weights are ``κ = Σ_tokens S`` ("lifted") or the contributions' norms ("positions").
        """
        S = self.coefficients(x, mask)
        if self.settings.layout == "lifted":
            kappa = S.sum(1)  # the output's sum over the lifted dims = sum over tokens
            return kappa @ self.atoms, kappa, S
        return S @ self.atoms.sum(1), self.contributions(S).norm(dim=-1), S


# ----------------------------------------------------------------------------------------- training


def train_block(
    kind: str,
    settings: FourierSettings,
    lift: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    progress: bool = True,
) -> tuple[FourierBlock, list[float]]:
    """Train one block on ``train`` (signals, masks); return it and its per-step reconstruction loss."""
    s = settings
    torch.manual_seed(s.seed * 1000 + KINDS.index(kind))
    block = FourierBlock(kind, s, lift)
    lr = s.lr_dense if kind == "dense" else s.lr_sparse
    # λ learns at lambda_lr_scale·lr: under Adam the L1 term's small but steady push on λ raises the
    # thresholds at the full rate, and on seed 2 every code died mid-run (masked NMSE back to 1.0).
    if kind == "sparse":
        others = [p for name, p in block.named_parameters() if name != "lam"]
        groups = [{"params": others, "lr": lr}, {"params": [block.lam], "lr": lr * s.lambda_lr_scale}]
    else:
        groups = [{"params": list(block.parameters()), "lr": lr}]
    opt = torch.optim.Adam(groups)
    max_lrs = [group["lr"] for group in groups]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lrs, total_steps=s.steps, pct_start=0.1)
    batches = torch.Generator().manual_seed(s.seed * 1000 + 17)  # the same batches for both blocks
    x_all, m_all = train
    losses: list[float] = []
    bar = progress_bar(range(s.steps), desc=f"fourier {kind}", disable=not progress, dynamic_ncols=True)
    warmup = max(1, int(s.sparsity_warmup * s.steps))
    for step in bar:
        idx = torch.randint(len(x_all), (s.batch_size,), generator=batches)
        x, m = x_all[idx], m_all[idx]
        y, _, S = block(x, m)
        rec = (y - x).pow(2).mean() / x.pow(2).mean()  # relative error over all 64 samples
        loss = rec
        if kind == "sparse":
            # Ramped so the codes first learn to reconstruct; at full weight from the start they die.
            loss = loss + s.sparsity_weight * min(1.0, step / warmup) * l1_sparsity(S)
            if s.orthogonality_weight:
                loss = loss + s.orthogonality_weight * orthogonality(block.D)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(rec.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(rec=f"{sum(losses[-50:]) / 50:.3f}")
    bar.close()
    return block, losses


# -------------------------------------------------------------------------------------- measurement


def partial_sum_errors(contrib: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error of the partial sums of the top-k contributions, k = 1..atoms.

    ``contrib``: (n, atoms, T) with ``contrib.sum(1) == y``. Returns the errors (n, atoms) and the
    ranking (n, atoms): atoms sorted by contribution norm, largest first.
    """
    order = contrib.norm(dim=-1).argsort(dim=1, descending=True)
    partial = torch.gather(contrib, 1, order[..., None].expand_as(contrib)).cumsum(1)
    err = (partial - y[:, None]).norm(dim=-1) / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return err, order


def atoms_needed(err: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per signal, the fewest top atoms whose partial sum is within ``tolerance`` (relative)."""
    ok = err <= tolerance
    ok[:, -1] = True  # all atoms together are the output (exact up to rounding)
    return ok.float().argmax(dim=1) + 1


def spectra(atoms: torch.Tensor) -> torch.Tensor:
    """Energy per frequency 0..T/2 of each atom (rows), cosine and sine together; rows sum to ‖atom‖²."""
    T = atoms.shape[-1]
    E = torch.fft.rfft(atoms, dim=-1).abs().pow(2) / T
    E[:, 1 : (T + 1) // 2] *= 2  # the mirrored half of the spectrum
    return E


def atom_spectra(block: FourierBlock, contrib: torch.Tensor) -> torch.Tensor:
    """Each atom's energy per frequency (atoms, T/2 + 1), the spectrum that says whether it is Fourier-like.

    "lifted": the spectrum of the atom itself (a 64-sample curve). "positions": an atom is a vector
    in the lifted space, and its shape over the samples is its contribution curve, which varies with
    the signal; its spectrum is the sum of those curves' spectra over the held-out signals.
    """
    if block.settings.layout == "lifted":
        return spectra(block.atoms)
    n, m, t = contrib.shape
    return spectra(contrib.reshape(n * m, t)).view(n, m, -1).sum(0)


def linear_reference(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """Masked NMSE of the least-squares linear map masked signal → signal (the best linear block)."""
    x, m = (t.double() for t in train)
    inp = torch.cat([x * m, m], dim=1)
    W = torch.linalg.lstsq(inp, x).solution
    xt, mt = (t.double() for t in test)
    y = torch.cat([xt * mt, mt], dim=1) @ W
    un = 1 - mt
    return (((y - xt) * un).pow(2).sum() / (xt * un).pow(2).sum()).item()


@torch.no_grad()
def evaluate(
    block: FourierBlock,
    test: tuple[torch.Tensor, torch.Tensor],
    settings: FourierSettings,
    bases: torch.Tensor | None,
) -> dict[str, Any]:
    """Every measure of one trained block on the held-out signals (see the module docstring)."""
    s = settings
    x, mask = test
    y, _, S = block(x, mask)
    atoms = block.atoms
    contrib = block.contributions(S)
    unobserved = 1 - mask
    masked_nmse = ((y - x) * unobserved).pow(2).sum() / (x * unobserved).pow(2).sum()
    err, order = partial_sum_errors(contrib, y)
    need = atoms_needed(err, s.tolerance)
    # Basis-free reference: principal directions of this block's outputs.
    _, _, Vh = torch.linalg.svd(y, full_matrices=False)
    pca_err, _ = partial_sum_errors((y @ Vh.T)[:, :, None] * Vh[None], y)
    pca_need = atoms_needed(pca_err, s.tolerance)
    used = torch.zeros(atoms.shape[0], dtype=torch.bool)
    for i in range(len(y)):
        used[order[i, : int(need[i])]] = True
    E = atom_spectra(block, contrib)
    share, dominant = E.max(dim=-1)
    share = share / E.sum(-1).clamp_min(1e-30)
    fourier = used & (share >= s.fourier_share)
    result: dict[str, Any] = {
        "masked_nmse": masked_nmse.item(),
        "full_nmse": ((y - x).pow(2).sum() / x.pow(2).sum()).item(),
        "atoms_total": atoms.shape[0],
        "atoms_needed_mean": need.float().mean().item(),
        "atoms_needed_median": need.float().median().item(),
        "atoms_needed_max": int(need.max()),
        "pca_atoms_needed_mean": pca_need.float().mean().item(),
        "atoms_used_by_any_signal": int(used.sum()),
        "fourier_like_atoms": int(fourier.sum()),
        "fourier_like_frequencies": sorted(dominant[fourier].tolist()),
        "dominant_share_of_used_atoms_mean": share[used].mean().item(),
        "nonzero_coefficients_fraction": (S != 0).float().mean().item(),
        "partial_sum_error_mean": err.mean(0).tolist(),
    }
    if bases is not None:
        in_band = E[:, bases].sum(-1) / E.sum(-1).clamp_min(1e-30)
        result["used_atoms_energy_at_generating_frequencies"] = in_band[used].mean().item()
    return result


# ------------------------------------------------------------------------------------------- output


def _figure(example: dict[str, Any], result: dict[str, Any]) -> bytes:
    """Figure 9 in spirit: a signal, its observations, both reconstructions, the sparse atoms it uses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=[1.0, 1.4])
    t = list(range(len(example["signal"])))
    obs = [i for i, v in enumerate(example["mask"]) if v > 0]
    dense, sparse = result["dense"], result["sparse"]

    ax = fig.add_subplot(grid[0, :])
    ax.plot(t, example["signal"], color="black", lw=2, label="signal")
    ax.plot(obs, [example["signal"][i] for i in obs], "o", color="black", ms=6, label="16 observations")
    ax.plot(
        t, example["dense"], color="tab:blue", lw=1.5, label=f"dense A·X·W_v ({example['dense_atoms']} atoms)"
    )
    ax.plot(
        t,
        example["sparse"],
        color="tab:red",
        lw=1.5,
        label=f"sparse σ(A·X·W_s)·D ({example['sparse_atoms']} atoms)",
    )
    ax.set_title(
        f"{result['settings']['layout']} layout, a held-out signal; masked NMSE over "
        f"{result['settings']['eval_signals']} held-out signals: dense {dense['masked_nmse']:.3f}, "
        f"sparse {sparse['masked_nmse']:.3f}, best linear map {result['linear_nmse']:.3f}"
    )
    ax.set_xlabel("position")
    ax.legend(loc="upper right", fontsize=8, ncol=2)

    ax = fig.add_subplot(grid[1, 0])
    for kind, color in (("dense", "tab:blue"), ("sparse", "tab:red")):
        curve = result[kind]["partial_sum_error_mean"]
        ax.plot(
            range(1, len(curve) + 1),
            curve,
            color=color,
            label=f"{kind}: {result[kind]['atoms_needed_mean']:.1f} atoms",
        )
    ax.axhline(result["settings"]["tolerance"], color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("top atoms kept (by contribution)")
    ax.set_ylabel("relative error of the partial sum")
    ax.set_title("atoms needed (mean over held-out signals)")
    ax.legend(fontsize=8)

    top = example["sparse_top_contributions"]
    ax = fig.add_subplot(grid[1, 1])
    for i, curve in enumerate(top):
        peak = max(abs(v) for v in curve) or 1.0
        ax.plot(t, [v / peak - 2.2 * i for v in curve], color="tab:red", lw=1)
    ax.set_yticks([])
    ax.set_xlabel("position")
    ax.set_title(f"its top {len(top)} sparse atoms' contributions (scaled)")

    ax = fig.add_subplot(grid[1, 2])
    for i, spec in enumerate(example["sparse_top_spectra"]):
        peak = max(spec) or 1.0
        ax.bar(range(len(spec)), [v / peak for v in spec], bottom=-1.2 * i, color="tab:red", width=0.8)
    for f in result.get("bases") or []:
        ax.axvline(f, color="black", lw=0.6, ls=":")
    ax.set_yticks([])
    ax.set_xlabel("frequency (cycles / 64 samples)")
    ax.set_title("their spectra (dotted: generating frequencies)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


@torch.no_grad()
def _example(
    blocks: dict[str, FourierBlock], test: tuple[torch.Tensor, torch.Tensor], settings: FourierSettings
) -> dict[str, Any]:
    """The held-out signal shown in the figure (the first one) and the sparse atoms it needs."""
    x, m = test[0][:1], test[1][:1]
    out: dict[str, Any] = {"signal": x[0].tolist(), "mask": m[0].tolist()}
    for kind, block in blocks.items():
        y, _, S = block(x, m)
        contrib = block.contributions(S)
        err, order = partial_sum_errors(contrib, y)
        k = int(atoms_needed(err, settings.tolerance)[0])
        out[kind] = y[0].tolist()
        out[f"{kind}_atoms"] = k
        if kind == "sparse":
            top = order[0, : min(k, 12)]
            out["sparse_top_atom_ids"] = top.tolist()
            out["sparse_top_contributions"] = contrib[0, top].tolist()
            out["sparse_top_spectra"] = spectra(contrib[0, top]).tolist()
    return out


def run_fourier(settings: FourierSettings, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Generate the data, train both blocks, measure, write ``fourier.json`` and ``fourier.png``.

    Returns the dict written to ``fourier.json``: ``settings``, ``bases`` (shared frequencies or None),
    ``linear_nmse``, ``dense`` and ``sparse`` (see ``evaluate``; plus ``train_seconds`` and the final
    ``train_loss``), ``ratio_atoms_needed`` (dense / sparse), ``example`` (the plotted signal),
    ``seconds`` (the whole run) and ``environment``.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    s = settings
    s.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(s.seed)
    lift = torch.randn(s.lift_dim, generator=g)
    bases = torch.randperm(s.max_freq + 1, generator=g)[: s.n_bases].sort().values if s.shared_bases else None
    train = make_signals(s, s.train_signals, g, bases)
    test = make_signals(s, s.eval_signals, g, bases)

    result: dict[str, Any] = {
        "settings": asdict(s),
        "bases": None if bases is None else bases.tolist(),
        "linear_nmse": linear_reference(train, test),
    }
    blocks: dict[str, FourierBlock] = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        block, losses = train_block(kind, s, lift, train, progress)
        train_seconds = time.perf_counter() - t0
        block.eval()
        blocks[kind] = block
        tail = losses[-max(1, len(losses) // 20) :]
        result[kind] = evaluate(block, test, s, bases) | {
            "train_seconds": train_seconds,
            "train_loss": sum(tail) / len(tail),
        }
    result["ratio_atoms_needed"] = (
        result["dense"]["atoms_needed_mean"] / result["sparse"]["atoms_needed_mean"]
    )
    result["example"] = _example(blocks, test, s)
    result["environment"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    png = _figure(result["example"], result)
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start  # all threads; wall time varies with load
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out_dir / "fourier.png", lambda p: p.write_bytes(png))
    atomic_write(out_dir / "fourier.json", lambda p: p.write_text(text))
    return result
