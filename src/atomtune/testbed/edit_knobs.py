"""The knob each method offers to move an adapter from "the source image" back to the pretrained
model, for the edit benchmark:

- atoms: keep the top-k atoms of every module by contribution (k from the budget down to 1), and
  the control, the same count of atoms per module drawn at random;
- LoRA and DoRA: the weight update ``ΔW = W_tuned − W`` of every adapted projection, scaled
  (``W + s·ΔW``, s from 1 to 0; for LoRA exactly PEFT's adapter scale) or truncated to its top-r
  singular directions (``W + SVD_r(ΔW)``);
- OFT: the rotation scaled, PEFT's skew-symmetric generator ``Q`` of every block multiplied by t
  (``R = Cayley(t·Q)``: a rotation for every t, the identity at 0, the trained one at 1).

PEFT's layers are read, never rewritten: the tuned weight of a projection is what its forward
does to the identity matrix, so every method's own forward (DoRA's norm, OFT's Cayley-Neumann
series) defines ``W_tuned``; a knob point then loads ``W + f(ΔW)`` into the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from atomtune.core.selection import top_k_masks
from atomtune.errors import AtomtuneError

Weights = dict[str, torch.Tensor]


# -- atoms -----------------------------------------------------------------------------------------
def live_atoms(handle) -> dict[str, torch.Tensor]:
    """Per module, the atoms the adapter really has (a budgeted adapter pads heads with inert ones)."""
    return {name: (atoms.mask != 0).cpu() for name, atoms in handle.atoms().items()}


def topk_masks(contribution: dict[str, torch.Tensor], live: dict[str, torch.Tensor], k: int):
    """Keep the ``k`` live atoms of each module with the largest contribution."""
    ranked = {n: c.double() * live[n] - (~live[n]).double() for n, c in contribution.items()}
    return {n: m & live[n] for n, m in top_k_masks(ranked, k).items()}


def random_masks(live: dict[str, torch.Tensor], k: int, generator: torch.Generator):
    """The control: as many atoms per module as ``topk_masks`` keeps, drawn at random among the live."""
    noise = {
        n: torch.rand(len(m), generator=generator, dtype=torch.float64) * m - (~m).double()
        for n, m in live.items()
    }
    return {n: m & live[n] for n, m in top_k_masks(noise, k).items()}


# -- PEFT's adapters as weight updates ---------------------------------------------------------------
def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@torch.no_grad()
def tuned_weights(model: nn.Module) -> Weights:
    """Per adapted projection, the weight its tuned forward applies: ``layer(I) − layer(0)``, transposed
    (exact for any adapter that is affine in its input: LoRA, DoRA, OFT)."""
    out = {}
    for name, layer in tuner_layers(model).items():
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise AtomtuneError(f"{name}: only linear projections have a weight update here")
        eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        out[name] = (layer(eye) - layer(torch.zeros_like(eye[:1]))).T.contiguous()
    return out


@torch.no_grad()
def rotation_weights(model: nn.Module, t: float) -> Weights:
    """OFT's tuned weights with every block's skew-symmetric generator scaled by ``t``."""
    layers = tuner_layers(model)
    saved = {}
    try:
        for name, layer in layers.items():
            if not hasattr(layer, "oft_R"):
                raise AtomtuneError(f"{name} is no OFT layer: the rotation knob is OFT's")
            for key, module in layer.oft_R.items():
                saved[(name, key)] = module.weight.detach().clone()
                module.weight.mul_(t)
        return tuned_weights(model)
    finally:
        for (name, key), weight in saved.items():
            layers[name].oft_R[key].weight.copy_(weight)


def base_weights(model: nn.Module) -> Weights:
    """The pretrained weights under the adapted projections (copies)."""
    return {n: layer.get_base_layer().weight.detach().clone() for n, layer in tuner_layers(model).items()}


def scaled(base: Weights, tuned: Weights, s: float) -> Weights:
    """``W + s·(W_tuned − W)``: s=1 the adapter, s=0 the pretrained model."""
    return {n: base[n] + s * (tuned[n] - base[n]) for n in tuned}


def truncated(base: Weights, tuned: Weights, rank: int) -> Weights:
    """``W + SVD_rank(W_tuned − W)``: the update kept to its ``rank`` largest singular directions."""
    if rank < 0:
        raise AtomtuneError(f"rank must be >= 0, got {rank}")
    out = {}
    for n in tuned:
        delta = (tuned[n] - base[n]).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        out[n] = base[n] + ((u[:, :r] * s[:r]) @ vh[:r]).to(base[n].dtype)
    return out


def update_rank(base: Weights, weights: Weights, tol: float = 1e-5) -> dict[str, int]:
    """The numerical rank of each projection's update (singular values above ``tol`` x the largest)."""
    ranks = {}
    for n in weights:
        s = torch.linalg.svdvals((weights[n] - base[n]).double())
        ranks[n] = int((s > tol * s.max().clamp(min=1e-300)).sum()) if len(s) else 0
    return ranks


@contextmanager
def loaded(model: nn.Module, weights: Weights) -> Iterator[None]:
    """``model`` (no adapter in it) with the given projections' weights swapped in, restored after."""
    modules = dict(model.named_modules())
    missing = sorted(set(weights) - set(modules))
    if missing:
        raise AtomtuneError(f"no projection named {missing[0]!r} in the model")
    saved = {n: modules[n].weight.detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                modules[n].weight.copy_(w)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.copy_(w)


def peft_points(tuned, method: str, scales, ranks) -> tuple[Weights, list[tuple[str, float, Callable]]]:
    """A trained PEFT adapter's tuned weights and its knob points as (knob, value, weights): read
    them before unloading it. LoRA/DoRA: ``scale`` at each of ``scales`` and ``rank`` at each of
    ``ranks``; OFT: ``rotation`` at each of ``scales``. Weights are made when a point is drawn."""
    model = tuned.model
    base, full = base_weights(model), tuned_weights(model)
    if method == "oft":
        rotated = {t: rotation_weights(model, t) for t in scales}
        return full, [("rotation", float(t), lambda t=t: rotated[t]) for t in scales]
    points: list[tuple[str, float, Callable]] = []
    points += [("scale", float(s), lambda s=s: scaled(base, full, s)) for s in scales]
    points += [("rank", int(r), lambda r=r: truncated(base, full, r)) for r in ranks]
    return full, points
