"""Where each atom acts: the magnitude of its coefficient per token, kept token by token.

``AtomStatistics`` averages coefficients over tokens to rank atoms; this keeps the token axis. On a
diffusion transformer the tokens of self-attention are image patches laid out row by row on the
latent grid, so ``E|s_m|`` per token is atom m's activation map over the image. Modules whose token
count is not the grid's (cross-attention's keys and values see text tokens) are not mapped.

Each map is averaged over the batch (both halves of classifier-free guidance) and over the forward
passes of a band of sampler steps: band ``b`` of ``bands`` holds the calls ``i`` (one per step)
with ``i * bands // steps == b``. Memory: modules x atoms x tokens x bands float32 values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atomtune.core.layer import AtomLayer

if TYPE_CHECKING:
    from atomtune.core.model import AtomModel


class AtomActivationMaps:
    """Collect ``E|s_m|`` per token of every mapped module of the active adapter while in a ``with``.

    ``grid``: the (rows, columns) the tokens lie on; ``steps``: forward passes per module in one
    sampling run (the sampler's steps), to place each call in its band.
    """

    def __init__(self, atom_model: AtomModel, grid: tuple[int, int], steps: int, bands: int = 3) -> None:
        if steps < 1 or bands < 1:
            raise ValueError(f"steps and bands must be >= 1, got {steps} and {bands}")
        self.atom_model, self.grid, self.steps, self.bands = atom_model, grid, steps, min(bands, steps)
        self.sums: dict[str, torch.Tensor] = {}  # (bands, M, tokens), float32
        self.calls: dict[str, int] = {}
        self._names = {id(layer): name for name, layer in atom_model.layers().items()}

    def __enter__(self) -> AtomActivationMaps:
        for layer in self.atom_model.layers().values():
            layer.listeners.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.atom_model.layers().values():
            if self._observe in layer.listeners:
                layer.listeners.remove(self._observe)

    def _observe(self, layer: AtomLayer, s: torch.Tensor) -> None:
        name = self._names[id(layer)]
        tokens = self.grid[0] * self.grid[1]
        if s.dim() != 3 or s.shape[1] != tokens:
            return  # not image tokens: no map
        call = self.calls.get(name, 0)
        self.calls[name] = call + 1
        band = min(call * self.bands // self.steps, self.bands - 1)
        per_token = s.abs().float().mean(0).T  # (M, tokens), batch mean
        if name not in self.sums:
            self.sums[name] = torch.zeros(self.bands, *per_token.shape, device=s.device)
        self.sums[name][band] += per_token

    def band_calls(self, name: str) -> torch.Tensor:
        """How many forward passes fell into each band (the divisor of its mean)."""
        calls = torch.arange(self.calls.get(name, 0))
        bands = (calls * self.bands // self.steps).clamp(max=self.bands - 1)
        return torch.bincount(bands, minlength=self.bands)

    def maps(self) -> dict[str, torch.Tensor]:
        """Per module: (bands + 1, M, rows, columns) on the CPU: each band's mean map, then the mean
        over all steps (index ``-1``)."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.band_calls(name).to(torch.float32)
            per_band = sums.cpu() / counts.clamp(min=1)[:, None, None]
            overall = sums.cpu().sum(0, keepdim=True) / counts.sum().clamp(min=1)
            out[name] = torch.cat([per_band, overall]).reshape(self.bands + 1, -1, *self.grid)
        return out
