"""Rendered digits and their captions: real handwriting (scikit-learn's 1,797 8x8 digits) with
controlled stroke color, position and size, so that a caption's every word can be checked.

A sample is a 24x24 RGB canvas (values in [-1, 1], black background) holding one digit drawn
small (8 px) at one of five places, or large (16 px) in the centre, in one of five colors.
Everything is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CANVAS = 24
SMALL, LARGE = 8, 16
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0),
}
# top-left corner of a small digit at each place (a 2 px margin)
PLACES: dict[str, tuple[int, int]] = {
    "in the top left corner": (2, 2),
    "in the top right corner": (2, CANVAS - SMALL - 2),
    "in the bottom left corner": (CANVAS - SMALL - 2, 2),
    "in the bottom right corner": (CANVAS - SMALL - 2, CANVAS - SMALL - 2),
    "in the center": ((CANVAS - SMALL) // 2, (CANVAS - SMALL) // 2),
}
SIZES = ("small", "large")


@dataclass(frozen=True)
class Attributes:
    """What a caption says about one rendered digit; ``subject`` replaces the digit's word."""

    digit: int
    color: str
    size: str
    place: str  # one of PLACES; large digits are always centred

    def caption(self, subject: str | None = None) -> str:
        noun = subject if subject is not None else WORDS[self.digit]
        where = "" if self.size == "large" else f" {self.place}"
        return f"a {self.size} {self.color} {noun}{where}"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) in [0, 1] and labels (1797,). Ships with sklearn."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def split_indices(
    labels: np.ndarray, seed: int = 0, holdout_share: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split of the real digits (per class), for judges and pretraining."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(len(idx) * holdout_share)
        held.extend(idx[:cut])
        train.extend(idx[cut:])
    return np.sort(np.array(train)), np.sort(np.array(held))


def render(glyph: np.ndarray | torch.Tensor, attrs: Attributes) -> torch.Tensor:
    """Draw an 8x8 glyph (intensity in [0, 1]) on a black canvas: (3, 24, 24) in [-1, 1]."""
    g = torch.as_tensor(glyph, dtype=torch.float32)[None, None]
    size = SMALL if attrs.size == "small" else LARGE
    if size != g.shape[-1]:
        g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
    g = g[0, 0].clamp(0, 1)
    top, left = PLACES[attrs.place] if attrs.size == "small" else ((CANVAS - LARGE) // 2,) * 2
    canvas = torch.zeros(3, CANVAS, CANVAS)
    color = torch.tensor(COLORS[attrs.color])[:, None, None]
    canvas[:, top : top + size, left : left + size] = color * g
    return canvas * 2 - 1


def render_batch(glyphs: np.ndarray | torch.Tensor, attrs: list[Attributes]) -> torch.Tensor:
    """``render`` for many glyphs at once (B, 3, 24, 24): one resize per size, no Python per pixel.

    Pretraining draws every batch from scratch; per-sample rendering kept a GPU waiting on the CPU.
    """
    g = torch.as_tensor(np.asarray(glyphs), dtype=torch.float32)[:, None]
    canvas = torch.zeros(len(attrs), 3, CANVAS, CANVAS)
    colors = torch.tensor([COLORS[a.color] for a in attrs])[:, :, None, None]
    for size_name, size in (("small", SMALL), ("large", LARGE)):
        idx = [i for i, a in enumerate(attrs) if a.size == size_name]
        if not idx:
            continue
        scaled = (
            g[idx]
            if size == g.shape[-1]
            else F.interpolate(g[idx], size=(size, size), mode="bilinear", align_corners=False)
        )
        scaled = scaled.clamp(0, 1) * colors[idx]
        for j, i in enumerate(idx):
            top, left = PLACES[attrs[i].place] if size_name == "small" else ((CANVAS - LARGE) // 2,) * 2
            canvas[i, :, top : top + size, left : left + size] = scaled[j]
    return canvas * 2 - 1


def random_attributes(digit: int, rng: np.random.Generator) -> Attributes:
    size = SIZES[rng.integers(len(SIZES))]
    place = list(PLACES)[rng.integers(len(PLACES))] if size == "small" else "in the center"
    return Attributes(digit, list(COLORS)[rng.integers(len(COLORS))], size, place)


def all_captions(digits: list[int], subject: str | None = None) -> list[str]:
    """Every caption the templates can make for these digits (for precomputing text features)."""
    out = []
    for d in digits:
        for color in COLORS:
            out.append(Attributes(d, color, "large", "in the center").caption(subject))
            out.extend(Attributes(d, color, "small", p).caption(subject) for p in PLACES)
    return out
