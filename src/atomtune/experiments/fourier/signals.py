"""The toy's data: sums of a few cosines, most samples masked (supplementary C.1).

Kept apart from the model so the same signals can be drawn for both blocks and the linear reference.
"""

from __future__ import annotations

import math

import torch

from atomtune.experiments.fourier.settings import FourierSettings


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
