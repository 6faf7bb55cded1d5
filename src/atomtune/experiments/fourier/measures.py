"""What the toy measures of a trained block: its error, the atoms a signal needs, Fourier-likeness.

The definitions are the package docstring's; each is a small function so the tests can check it
against a hand computation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from atomtune.experiments.fourier.block import FourierBlock
from atomtune.experiments.fourier.settings import FourierSettings


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


def subspace_basis(bases: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(T, d) orthonormal basis of the signals' subspace: cos and sin at each shared frequency."""
    t = torch.arange(seq_len, dtype=torch.float64)
    cols = []
    for f in bases.tolist():
        cols.append(torch.cos(2 * math.pi * f * t / seq_len))
        if 0 < f < seq_len / 2:  # sin vanishes at 0 and at the Nyquist frequency
            cols.append(torch.sin(2 * math.pi * f * t / seq_len))
    return torch.linalg.qr(torch.stack(cols, 1))[0]


def subspace_references(
    test: tuple[torch.Tensor, torch.Tensor], bases: torch.Tensor, steps: int = 4
) -> dict[str, Any]:
    """Masked NMSE of estimators that know the frequencies: how hard the task is, and how deep.

    ``oracle_nmse``: least squares of the subspace coefficients on each signal's observations (0 up
    to rounding when the observations pin the coefficients down). ``landweber_nmse[k-1]``: k steps of
    ``x̂ ← x̂ + η·P_S(m⊙(x − x̂))`` from 0 with the best η of a grid, a stand-in for k attention layers
    that each pass the observed residual through the subspace's kernel. ``polynomial_nmse[k-1]``: the
    best fixed combination of those k steps' Krylov terms ``Φ·Gʲ·Φ_oᵀx_o`` (j < k), fitted on these
    signals (optimistic); ``G = Φ_oᵀΦ_o``.
    """
    x, m = (t.double() for t in test)
    phi = subspace_basis(bases, x.shape[1])
    unobserved = 1 - m

    def nmse(y: torch.Tensor) -> float:
        return (((y - x) * unobserved).pow(2).sum() / (x * unobserved).pow(2).sum()).item()

    rows = m[:, :, None] * phi  # Φ_o with zero rows at the masked samples, (n, T, d)
    gram = rows.transpose(1, 2) @ rows
    b = (rows.transpose(1, 2) @ x[..., None])[..., 0]
    coef = (torch.linalg.pinv(gram) @ b[..., None])[..., 0]
    landweber = []
    for k in range(1, steps + 1):
        best = math.inf
        for eta in (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0):
            y = torch.zeros_like(x)
            for _ in range(k):
                y = y + eta * (m * (x - y)) @ phi @ phi.T
            best = min(best, nmse(y))
        landweber.append(best)
    polynomial, terms, v = [], [], b
    for _ in range(steps):
        terms.append(v @ phi.T)
        v = (gram @ v[..., None])[..., 0]
        features = torch.stack(terms, -1)
        sel = unobserved.bool()
        a = torch.linalg.lstsq(features[sel], x[sel][:, None]).solution
        polynomial.append(nmse((features @ a)[..., 0]))
    return {
        "oracle_nmse": nmse(coef @ phi.T),
        "landweber_nmse": landweber,
        "polynomial_nmse": polynomial,
    }


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
