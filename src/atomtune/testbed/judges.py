"""Judges for generated digits: what a DINO / CLIP score does for photographs, checked exactly here.

- ``DigitClassifier``: a small CNN trained on the real digits of all ten classes (train split),
  validated on the held-out real digits. Fidelity = probability of the target class, and cosine of
  its penultimate features to the instance images' (our stand-in for DINO and CLIP-I).
- ``measure``: stroke color, place and size read off the pixels, compared with the prompt (our
  stand-in for CLIP-T): the share of the three attributes the image gets right.

Both look at the digit through ``extract_glyph``, which finds the stroke pixels, crops their
bounding box to a square and scales it to 8x8, so a judge sees the same thing for real renders and
for generated images.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atomtune.errors import AtomtuneError
from atomtune.testbed.digits import (
    COLORS,
    LARGE,
    PLACES,
    SMALL,
    Attributes,
    load_digits,
    random_attributes,
    render,
    split_indices,
)

JUDGE_WEIGHTS = "digit_judge.safetensors"
INK = 0.25  # intensity above which a pixel counts as stroke


def ink_mask(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, H, W) bool: stroke pixels (any channel bright)."""
    return image.amax(1) > INK


def extract_glyph(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 1, 8, 8): the stroke's bounding box as a square, scaled to 8x8."""
    out = []
    intensity = image.amax(1)
    for img, ink in zip(intensity, ink_mask(image), strict=True):
        ys, xs = ink.nonzero(as_tuple=True)
        if len(ys) == 0:
            out.append(torch.zeros(1, 8, 8))
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = max(y1 - y0, x1 - x0)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        padded = F.pad(img, (side, side, side, side))
        top, left = round(cy - side / 2) + side, round(cx - side / 2) + side
        crop = padded[top : top + side, left : left + side][None, None]
        glyph = F.interpolate(crop, size=(8, 8), mode="area")[0]
        out.append(glyph / glyph.max().clamp(min=1e-6))
    return torch.stack(out)


class DigitClassifier(nn.Module):
    """8x8 glyph → 10 classes; ``features`` is the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def features(self, glyph: torch.Tensor) -> torch.Tensor:
        return self.body(glyph)

    def forward(self, glyph: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(glyph))


def rendered_glyphs(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, copies: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits rendered with random attributes, then seen through ``extract_glyph``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(copies):
        for i in idx:
            xs.append(render(images[i], random_attributes(int(labels[i]), rng)))
            ys.append(int(labels[i]))
    canvas = (torch.stack(xs) + 1) / 2
    return extract_glyph(canvas), torch.tensor(ys)


def train_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the train split (all ten classes); return the model and held-out accuracy."""
    images, labels = load_digits()
    train_idx, held_idx = split_indices(labels)
    x, y = rendered_glyphs(images, labels, train_idx, copies=3, seed=seed)
    xv, yv = rendered_glyphs(images, labels, held_idx, copies=1, seed=seed + 1)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    return model, accuracy


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    from safetensors.torch import load_file

    path = Path(path) if path else Path(str(resources.files("atomtune.testbed") / "weights" / JUDGE_WEIGHTS))
    if not path.is_file():
        raise AtomtuneError(f"judge weights not found: {path} (run `atomtune testbed judges`)")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@dataclass
class Measured:
    """What the pixels say: nearest named color, place and size of the stroke (None if no ink)."""

    color: str | None
    place: str | None
    size: str | None


def measure(image: torch.Tensor) -> list[Measured]:
    """Read color, place and size off (B, 3, 24, 24) images in [0, 1]."""
    names = list(COLORS)
    palette = torch.tensor([COLORS[c] for c in names])
    palette = palette / palette.norm(dim=1, keepdim=True)
    anchors = torch.tensor([(top + SMALL / 2, left + SMALL / 2) for top, left in PLACES.values()])
    out = []
    for img, ink in zip(image, ink_mask(image), strict=True):
        if ink.sum() == 0:
            out.append(Measured(None, None, None))
            continue
        rgb = img[:, ink].mean(1)
        color = names[int((palette @ (rgb / rgb.norm().clamp(min=1e-6))).argmax())]
        ys, xs = ink.nonzero(as_tuple=True)
        height = max(int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1)
        size = "small" if height <= (SMALL + LARGE) / 2 else "large"
        centre = torch.tensor([(ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2])
        place = list(PLACES)[int((anchors - centre).norm(dim=1).argmin())]
        out.append(Measured(color, place, size))
    return out


def alignment(image: torch.Tensor, prompts: list[Attributes]) -> torch.Tensor:
    """Per image, the share of (color, size, place) that match the prompt; large digits sit centred."""
    scores = []
    for m, want in zip(measure(image), prompts, strict=True):
        place = want.place if want.size == "small" else "in the center"
        scores.append(((m.color == want.color) + (m.size == want.size) + (m.place == place)) / 3)
    return torch.tensor(scores, dtype=torch.float64)


def fidelity(
    classifier: DigitClassifier, image: torch.Tensor, target: int, references: torch.Tensor
) -> dict[str, torch.Tensor]:
    """P(target class), its log (which keeps ranking runs once P rounds to 1) and mean feature cosine
    to ``references`` (real instance images), per image."""
    with torch.no_grad():
        glyphs = extract_glyph(image)
        log_probs = classifier(glyphs).double().log_softmax(1)[:, target]
        feats = F.normalize(classifier.features(glyphs), dim=1)
        ref = F.normalize(classifier.features(extract_glyph(references)), dim=1)
    return {
        "p_target": log_probs.exp(),
        "log_p_target": log_probs,
        "feature_cosine": (feats @ ref.T).mean(1).double(),
    }


def train_and_save_judge(out: str | Path, epochs: int = 30, seed: int = 0) -> float:
    """Train the classifier, write its weights atomically to ``out``; return held-out accuracy."""
    from safetensors.torch import save_file

    from atomtune.io import atomic_write

    model, accuracy = train_classifier(epochs=epochs, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(
        Path(out), lambda p: save_file(state, str(p), metadata={"heldout_accuracy": f"{accuracy:.4f}"})
    )
    return accuracy
