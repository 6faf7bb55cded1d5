"""The one training loop of the VAE experiment: plain Adam on random minibatches.

Pretraining, both fine-tunes and the judge share it, so they differ only by what they train and on
which loss; its minibatches come from one generator per seed, so a run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from atomtune.experiments.vae.settings import VaeSettings


def train(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    images: torch.Tensor,
    s: VaeSettings,
    steps: int,
    desc: str,
    progress: bool,
    after_step: Callable[[int], float | None] | None = None,
) -> list[float]:
    """Adam at ``s.lr`` on minibatches of ``images``; returns the per-step losses.

    ``after_step(step)`` (steps counted from 1) runs after each update; a number it returns sets the
    learning rate to ``s.lr`` times it from then on (an atom budget's cut raises it for the survivors).
    """
    opt = torch.optim.Adam(params, lr=s.lr)
    g = torch.Generator().manual_seed(s.seed + 101)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = images[torch.randint(len(images), (s.batch_size,), generator=g)]
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        factor = None if after_step is None else after_step(step + 1)
        if factor is not None:
            for group in opt.param_groups:
                group["lr"] = s.lr * factor
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    bar.close()
    return losses
