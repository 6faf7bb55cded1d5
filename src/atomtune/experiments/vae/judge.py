"""The digit judge: a small CNN trained on real digits, which says which digit a generated image is.

Trained here, on the run's own training split, so the experiment needs no downloaded classifier;
its held-out accuracy is reported next to what it says of the generated digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atomtune.experiments.vae.settings import VaeSettings
from atomtune.experiments.vae.training import train


class DigitJudge(nn.Sequential):
    """A small CNN on 28x28 digits: two strided convolutions and a linear read-out (10 classes)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )


def train_judge(
    images: torch.Tensor, labels: torch.Tensor, s: VaeSettings, progress: bool
) -> tuple[DigitJudge, list[float]]:
    """Train the judge on real digits, shifted by up to 2 pixels so that it reads digits, not positions."""
    torch.manual_seed(s.seed + 7)
    judge = DigitJudge()
    g = torch.Generator().manual_seed(s.seed + 8)

    def loss_fn(batch_idx: torch.Tensor) -> torch.Tensor:
        dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(images[batch_idx], (dy, dx), dims=(2, 3))
        return F.cross_entropy(judge(x), labels[batch_idx])

    index = torch.arange(len(images))
    losses = train(loss_fn, list(judge.parameters()), index, s, s.judge_steps, "judge", progress)
    judge.eval()
    return judge, losses


@torch.no_grad()
def judge_images(judge: DigitJudge, images: torch.Tensor, s: VaeSettings) -> dict[str, float]:
    """P(new digit), P(old digit) (mean softmax) and the share judged the new digit (argmax)."""
    p = judge(images).softmax(-1)
    return {
        "p_new": p[:, s.new_digit].mean().item(),
        "p_old": p[:, s.old_digit].mean().item(),
        "share_judged_new": (p.argmax(-1) == s.new_digit).float().mean().item(),
    }
