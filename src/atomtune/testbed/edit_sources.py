"""The edit benchmark's sources and how one drawing of them is judged.

A source is one real handwritten digit (a different sample for every source, from the digits the
pretrained model knows and the held-out one), rendered small in one color at one place, with its
exact caption as the source prompt ("a small red three in the top left corner"). Its targets change
one attribute each: two other colors, two other places, and the other size (size has two values,
so its one target is drawn twice, with two sampling seeds: every attribute weighs two images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from atomtune.testbed import customize as cz
from atomtune.testbed.digits import COLORS, PLACES, Attributes, render_batch
from atomtune.testbed.judges import alignment, fidelity

KINDS = ("color", "place", "size")


@dataclass(frozen=True)
class Target:
    kind: str  # the attribute it changes: one of KINDS
    attributes: Attributes
    seed_offset: int  # added to the run's seed when it is drawn


@dataclass(frozen=True)
class Source:
    name: str
    attributes: Attributes
    image: torch.Tensor  # (3, 24, 24) in [-1, 1]
    glyph: np.ndarray  # the real 8x8 sample, intensity in [0, 1]
    targets: tuple[Target, ...]

    @property
    def digit(self) -> int:
        return self.attributes.digit

    @property
    def prompt(self) -> str:
        return self.attributes.caption()


def make_sources(report: tuple[int, ...], selection: tuple[int, ...]) -> tuple[list[Source], list[Source]]:
    """The report and selection sources: one distinct real sample per entry (disjoint between the
    two lists), each with its own color and place drawn from a fixed seed."""
    digits = [*report, *selection]
    glyphs: dict[int, list[np.ndarray]] = {
        d: list(cz.real_glyphs([d], digits.count(d), seed=d)) for d in set(digits)
    }
    sources = []
    for i, digit in enumerate(digits):
        split, index = ("r", i) if i < len(report) else ("s", i - len(report))
        rng = np.random.default_rng([7, i])
        color = str(rng.choice(list(COLORS)))
        place = str(rng.choice(list(PLACES)))
        attrs = Attributes(digit, color, "small", place)
        others = [c for c in COLORS if c != color]
        places = [p for p in PLACES if p != place]
        targets = [
            Target("color", Attributes(digit, str(c), "small", place), 0)
            for c in rng.choice(others, 2, replace=False)
        ]
        targets += [
            Target("place", Attributes(digit, color, "small", str(p)), 0)
            for p in rng.choice(places, 2, replace=False)
        ]
        large = Attributes(digit, color, "large", "in the center")
        targets += [Target("size", large, 0), Target("size", large, 1)]
        glyph = glyphs[digit].pop()
        image = render_batch(glyph[None], [attrs])[0]
        sources.append(Source(f"{split}{index}-{cz.word(digit)}", attrs, image, glyph, tuple(targets)))
    return sources[: len(report)], sources[len(report) :]


def judge(images: torch.Tensor, source: Source, classifier) -> dict[str, float]:
    """Scores of drawings of ``source``'s targets (in order): alignment to each target prompt (all of
    it, and per changed attribute), and identity: feature cosine of the drawn glyph to the source
    glyph and P(source digit)."""
    attrs = [t.attributes for t in source.targets]
    aligned = alignment(images, attrs)
    fid = fidelity(classifier, images, source.digit, (source.image[None] + 1) / 2)
    scores = {
        "alignment": aligned.mean().item(),
        "feature_cosine": fid["feature_cosine"].mean().item(),
        "p_source": fid["p_target"].mean().item(),
    }
    for kind in KINDS:
        index = [i for i, t in enumerate(source.targets) if t.kind == kind]
        scores[f"alignment_{kind}"] = aligned[index].mean().item()
    return scores


def draw_targets(pipe, source: Source, seed: int, steps: int) -> torch.Tensor:
    """Every target prompt of ``source`` once, (len(targets), 3, 24, 24) in [0, 1]."""
    texts = [t.attributes.caption() for t in source.targets]
    return pipe(texts, [seed + t.seed_offset for t in source.targets], steps, cz.GUIDANCE)


def reconstruction(pipe, source: Source, seed: int, steps: int, classifier, samples: int = 2) -> dict:
    """How well a model redraws the source from the source prompt: alignment to it, feature cosine to
    the source glyph and P(source digit), and their mean (``score``), over ``samples`` drawings."""
    images = pipe([source.prompt] * samples, [seed + i for i in range(samples)], steps, cz.GUIDANCE)
    fid = fidelity(classifier, images, source.digit, (source.image[None] + 1) / 2)
    scores = {
        "alignment": alignment(images, [source.attributes] * samples).mean().item(),
        "feature_cosine": fid["feature_cosine"].mean().item(),
        "p_source": fid["p_target"].mean().item(),
    }
    scores["score"] = sum(scores.values()) / 3
    return scores
