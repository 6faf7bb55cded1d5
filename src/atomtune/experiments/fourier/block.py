"""The two attention blocks the toy compares, dense ``A·X·W_v`` and sparse ``σ_λ(A·X·W_s)·D``.

One class for both, so they share their tokens, their attention map and their definition of an atom;
only the value path differs. The sparse path runs through the core's kernel and shrinkage, so the toy
tests the same code a fine-tune uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from atomtune.core.functional import attention_with_atoms, merge_heads, split_heads
from atomtune.core.shrinkage import shrink
from atomtune.experiments.fourier.settings import KINDS, FourierSettings


def positional_encoding(seq_len: int) -> torch.Tensor:
    """(T, T − 1): cos and sin of 2π·k·t/T for k = 1 … T/2 − 1, and cos(π·t), per position t."""
    t = torch.arange(seq_len, dtype=torch.float32)[:, None]
    k = torch.arange(1, seq_len // 2, dtype=torch.float32)[None]
    angle = 2 * math.pi * k * t / seq_len
    return torch.cat([torch.cos(angle), torch.sin(angle), torch.cos(math.pi * t)], dim=1)


class MixingLayer(nn.Module):
    """A pre-norm transformer layer before the block: multi-head self-attention with a residual
    connection, then (``mlp_ratio`` > 0) a GELU MLP of ``mlp_ratio``·width hidden units, also residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = None
        if mlp_ratio:
            self.mlp = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, mlp_ratio * width),
                nn.GELU(),
                nn.Linear(mlp_ratio * width, width),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.out(mixed)
        return x if self.mlp is None else x + self.mlp(x)


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
            if s.position_products:
                raw += 2 * (s.seq_len - 1)
            self.register_buffer("position", positional_encoding(s.seq_len))
            self.mixing = nn.ModuleList(
                MixingLayer(c, s.mixing_heads, s.mixing_mlp) for _ in range(s.mixing_layers)
            )
        self.W_in = nn.Parameter(torch.randn(raw, c) / math.sqrt(raw))
        # "lifted": small q/k weights (0.02), so attention starts uniform and the sum over tokens starts
        # as a plain average. "positions": 1/√width, so the block can learn to attend by position sooner.
        self.W_q = nn.Parameter(torch.randn(c, c) * s.qk_init_std)
        self.W_k = nn.Parameter(torch.randn(c, c) * s.qk_init_std)
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
        "positions": token t is ``[x_t·m_t·p, m_t, PE(t), m_t·PE(t), x_t·m_t·PE(t)]·W_in``: its observed
        value lifted to 64 dims (0 where masked), its observation flag, a 63-d sinusoidal position code
        and (``position_products``) the code times the flag and times the observed value; then the
        mixing layers.
        """
        if self.settings.layout == "lifted":
            lifted = self.lift[None, :, None] * (x * mask)[:, None, :]
            flags = mask[:, None, :].expand(-1, self.lift.shape[0], -1)
            return torch.cat([lifted, flags], dim=-1) @ self.W_in
        lifted = (x * mask)[..., None] * self.lift
        position = self.position.expand(x.shape[0], -1, -1)
        parts = [lifted, mask[..., None], position]
        if self.settings.position_products:
            parts += [mask[..., None] * position, (x * mask)[..., None] * position]
        h = torch.cat(parts, dim=-1) @ self.W_in
        for layer in self.mixing:
            h = layer(h)
        return h

    def attention_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``q, k`` as (B, heads, tokens, width / heads) and the tokens ``X`` as (B, tokens, width)."""
        X = self.tokens(x, mask)
        heads = self.settings.block_heads
        return split_heads(X @ self.W_q, heads), split_heads(X @ self.W_k, heads), X

    def coefficients(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token coefficients (B, tokens, atoms): ``A·X`` (dense) or ``σ_λ(A·X·W_s)`` (sparse).

        With several heads (``block_heads``) head h attends with its own map ``A_h``: dense, over its
        share of X's channels (``concat_h A_h·X_h``, multi-head attention whose output projection is
        ``W_v``); sparse, over its share of the atoms (``σ_λ(concat_h A_h·X·W_s^h)``, the core's
        attention mode).
        """
        q, k, X = self.attention_inputs(x, mask)
        heads = self.settings.block_heads
        v = split_heads(X, heads)
        if self.kind == "dense":
            return merge_heads(F.scaled_dot_product_attention(q, k, v))
        # The core's kernel; two calls (fused=False) because on CPU the zero padding of the fused path
        # costs more than the second call at these sizes. Both paths are held equal by the core's tests.
        _, z = attention_with_atoms(q, k, v, split_heads(X @ self.W_s, heads), fused=False)
        return shrink(merge_heads(z), self.settings.shrinkage, lam=self.lam.abs(), k=self.settings.topk)

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
