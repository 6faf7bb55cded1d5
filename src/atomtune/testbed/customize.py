"""Mini-DreamBooth on the testbed: teach the pretrained digit model the held-out digit from a few
real handwritten samples, with any method of the one trainer, and judge what it draws.

Shared by ``testbed bench`` (all methods, seeds, learning rates) and ``demo`` (atoms, once). The
concept is the held-out digit's handwriting under a rare token ("a sks digit"); the instance
images show it in several colors, places and sizes, each under its own caption (those words plus the
token: "a large white sks digit"), and the 25 report prompts ask for it in other color x place x size
combinations by name; 5 more prompts choose settings and are never reported. A color style ("zwx style": magenta strokes, learned from
other digits) is the second adapter for the merge experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atomtune.diffusion.methods import DEFAULT_ATOM_BUDGET, DEFAULT_FORM, DEFAULT_NUM_ATOMS
from atomtune.errors import AtomtuneError
from atomtune.io import save_png, save_text
from atomtune.testbed.digit_pipeline import to_pil
from atomtune.testbed.digits import (
    COLORS,
    PLACES,
    SIZES,
    WORDS,
    Attributes,
    load_digits,
    render_batch,
    split_indices,
)
from atomtune.testbed.judges import alignment, fidelity, ink_mask, load_classifier

TOKEN = "sks"
SUBJECT = f"{TOKEN} digit"
INSTANCE_PROMPT = f"a {SUBJECT}"
STYLE_TOKEN = "zwx"
STYLE_PROMPT = f"a digit, {STYLE_TOKEN} style"
STYLE_RGB = (1.0, 0.1, 1.0)  # magenta: a color no pretraining caption names
GUIDANCE = 2.5
SAMPLE_STEPS = 20
# The atoms recipe on the testbed, chosen on the selection seed (benchmarks/results/testbed):
# The atoms' recipe on the testbed, as in ``atomtune train``: 64 atoms on each projection LoRA adapts,
# cut to RECIPE_BUDGET by contribution during training (chosen on the selection seeds: docs/quality.md).
RECIPE_NUM_ATOMS = DEFAULT_NUM_ATOMS[DEFAULT_FORM]
RECIPE_BUDGET = DEFAULT_ATOM_BUDGET
RECIPE_LR = 3e-4


@dataclass
class Prompt:
    """An evaluation prompt and, when it says them in the templates' words, its attributes."""

    text: str
    attributes: Attributes | None


def real_glyphs(digits: list[int], count: int, seed: int = 0) -> np.ndarray:
    """``count`` real handwritten samples of each of ``digits`` from the training split, picked by
    ``seed``: (len(digits)·count, 8, 8), digit-major."""
    images, labels = load_digits()
    train_idx, _ = split_indices(labels)
    rng = np.random.default_rng(seed)
    picks = [rng.choice(train_idx[labels[train_idx] == d], size=count, replace=False) for d in digits]
    return images[np.concatenate(picks)]


def instance_attributes(digit: int, count: int = 5, seed: int = 0) -> list[Attributes]:
    """Each instance image's color, place and size (as DreamBooth's photos show the subject in
    several settings)."""
    from atomtune.testbed.digits import random_attributes

    rng = np.random.default_rng([seed, 1])
    return [random_attributes(digit, rng) for _ in range(count)]


def instance_images(digit: int, count: int = 5, seed: int = 0) -> torch.Tensor:
    """The concept's instance images, in [-1, 1]: real samples of ``digit``, each in its own color,
    place and size (``instance_attributes``)."""
    return render_batch(real_glyphs([digit], count, seed), instance_attributes(digit, count, seed))


def instance_captions(digit: int, count: int = 5, seed: int = 0) -> list[str]:
    """Each instance image's own caption in the templates' words, the concept in the digit's slot
    ("a large white sks digit"): what varies between the images is named, so the token carries only
    the handwriting."""
    return [a.caption(SUBJECT) for a in instance_attributes(digit, count, seed)]


def style_images(holdout: int, count: int = 5, seed: int = 0) -> torch.Tensor:
    """The style's instance images: other digits, large and centred, in magenta strokes."""
    rng = np.random.default_rng(seed)
    digits = rng.choice([d for d in range(10) if d != holdout], size=count, replace=False)
    glyphs = np.concatenate([real_glyphs([int(d)], 1, seed + i) for i, d in enumerate(digits)])
    white = render_batch(glyphs, [Attributes(int(d), "white", "large", "in the center") for d in digits])
    ink = (white + 1) / 2  # white strokes: intensity in every channel
    return ink * torch.tensor(STYLE_RGB)[:, None, None] * 2 - 1


def write_images(images: torch.Tensor, folder: str | Path, captions: list[str] | None = None) -> Path:
    """Save (B, 3, H, W) images in [-1, 1] as PNGs (the trainer reads folders of images), with each
    image's caption in the folder's ``metadata.jsonl`` when given."""
    import json

    from atomtune.diffusion.data import CAPTIONS

    folder = Path(folder)
    names = [f"{i:02d}.png" for i in range(len(images))]
    for name, image in zip(names, to_pil((images + 1) / 2), strict=True):
        save_png(image, folder / name)
    if captions is not None:
        if len(captions) != len(names):
            raise AtomtuneError(f"{len(captions)} captions for {len(names)} images")
        lines = [json.dumps({"file_name": n, "text": c}) for n, c in zip(names, captions, strict=True)]
        save_text("\n".join(lines) + "\n", folder / CAPTIONS)
    return folder


def parse_prompt(text: str) -> Attributes | None:
    """Read color, size and place off a prompt in the templates' words (None if it lacks any)."""
    words = text.lower()
    color = next((c for c in COLORS if f" {c} " in f" {words} "), None)
    size = next((s for s in SIZES if f" {s} " in f" {words} "), None)
    place = next((p for p in PLACES if p in words), None)
    if color is None or size is None:
        return None
    if size == "large":
        place = "in the center"
    if place is None:
        return None
    return Attributes(-1, color, size, place)


def read_digit_prompts(path: str | Path) -> list[Prompt]:
    """One prompt per line; ``{}`` stands for the concept ("sks digit"). Blank lines and # skipped."""
    from atomtune.diffusion.data import read_prompts as read_lines

    texts = [ln.replace("{}", SUBJECT) for ln in read_lines(None, path)]
    if not texts:
        raise AtomtuneError(f"{path} holds no prompts")
    missing = [t for t in texts if TOKEN not in t.split()]
    if missing:
        raise AtomtuneError(f"prompt without the concept ({{}} or '{TOKEN}'): {missing[0]!r}")
    return [Prompt(t, parse_prompt(t)) for t in texts]


def all_prompts() -> list[Prompt]:
    """Every prompt of the templates for the concept: 5 colors x 6 (size, place) settings."""
    corners = [p for p in PLACES if p != "in the center"]
    settings = [("small", p) for p in corners] + [("large", "in the center"), ("small", "in the center")]
    return [
        Prompt(a.caption(SUBJECT), a) for a in (Attributes(-1, c, s, p) for c in COLORS for s, p in settings)
    ]


def selection_prompts() -> list[Prompt]:
    """The 5 prompts that choose settings and are never reported: one (size, place) setting per color,
    each setting a different one (a Latin-square diagonal: red top left, green top right, blue bottom
    left, yellow bottom right, white large), so that they are as hard as the report's prompts."""
    prompts = all_prompts()
    return [prompts[i * 6 + i] for i in range(len(COLORS))]


def report_prompts() -> list[Prompt]:
    """The 25 prompts the benchmark and the demo judge: every color x setting but the selection's."""
    chosen = {p.text for p in selection_prompts()}
    return [p for p in all_prompts() if p.text not in chosen]


def draw(pipe, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Every prompt with every seed, (len(prompts)·len(seeds), 3, 24, 24) in [0, 1], prompt-major."""
    texts = [p for p in prompts for _ in seeds]
    return pipe(texts, [s for _ in prompts for s in seeds], SAMPLE_STEPS, GUIDANCE)


def score_concept(
    pipe, prompts: list[Prompt], seeds: list[int], target: int, references: torch.Tensor, classifier=None
) -> tuple[dict[str, float], torch.Tensor]:
    """Fidelity (P(target), feature cosine to the instance images) and text alignment."""
    classifier = classifier or load_classifier()
    images = draw(pipe, [p.text for p in prompts], seeds)
    fid = fidelity(classifier, images, target, (references + 1) / 2)
    judged = [(i, p.attributes) for i, p in enumerate(p for p in prompts for _ in seeds) if p.attributes]
    scores = {
        "p_target": fid["p_target"].mean().item(),
        "log_p_target": fid["log_p_target"].mean().item(),
        "feature_cosine": fid["feature_cosine"].mean().item(),
    }
    if judged:
        index = torch.tensor([i for i, _ in judged])
        scores["alignment"] = alignment(images[index], [a for _, a in judged]).mean().item()
    return scores, images


def prior_prompts(holdout: int) -> list[tuple[str, int]]:
    """Two prompts per pretrained digit (large white centre, small red top-left) and their digit."""
    out = []
    for d in range(10):
        if d == holdout:
            continue
        out.append((Attributes(d, "white", "large", "in the center").caption(), d))
        out.append((Attributes(d, "red", "small", "in the top left corner").caption(), d))
    return out


def score_prior(pipe, holdout: int, seeds: list[int], classifier=None) -> float:
    """Prior preservation: the share of the other digits still drawn as themselves."""
    from atomtune.testbed.judges import extract_glyph

    classifier = classifier or load_classifier()
    prompts = prior_prompts(holdout)
    images = draw(pipe, [p for p, _ in prompts], seeds)
    truth = torch.tensor([d for _, d in prompts for _ in seeds])
    with torch.no_grad():
        predicted = classifier(extract_glyph(images)).argmax(1)
    return (predicted == truth).double().mean().item()


def prior_images(pipe, holdout: int, folder: str | Path, per_digit: int = 4, seed: int = 0) -> Path:
    """Prior preservation's class images: the pretrained model's own drawings of every other digit,
    each under its caption (random color, size and place), with ``metadata.jsonl`` pairing them.

    DreamBooth's "a dog" has no counterpart here ("a digit" is no caption the model knows), so the
    prior is what the model drew before: each image with the caption that made it.
    """
    import json

    from atomtune.io import atomic_write
    from atomtune.testbed.digits import random_attributes

    folder = Path(folder)
    if (folder / "metadata.jsonl").is_file():
        return folder
    rng = np.random.default_rng([seed, 2])
    captions = [
        random_attributes(d, rng).caption() for d in range(10) if d != holdout for _ in range(per_digit)
    ]
    images = pipe(captions, [seed + i for i in range(len(captions))], SAMPLE_STEPS, GUIDANCE)
    records = []
    for i, (image, caption) in enumerate(zip(to_pil(images), captions, strict=True)):
        save_png(image, folder / f"prior-{i:03d}.png")
        records.append(json.dumps({"file_name": f"prior-{i:03d}.png", "text": caption}))
    atomic_write(folder / "metadata.jsonl", lambda p: p.write_text("\n".join(records) + "\n"))
    return folder


def style_share(images: torch.Tensor) -> float:
    """The share of images whose mean stroke color is nearer the style's than any named color."""
    palette = torch.tensor([*COLORS.values(), STYLE_RGB])
    palette = palette / palette.norm(dim=1, keepdim=True)
    hits = []
    for img, ink in zip(images, ink_mask(images), strict=True):
        if ink.sum() == 0:
            hits.append(False)
            continue
        rgb = img[:, ink].mean(1)
        hits.append(int((palette @ (rgb / rgb.norm().clamp(min=1e-6))).argmax()) == len(COLORS))
    return float(np.mean(hits))


def train_adapter(
    pipe,
    method: str,
    instance_dir: Path,
    prompt: str,
    out_dir: Path,
    learning_rate: float,
    steps: int,
    seed: int,
    num_atoms: int,
    class_prompt: str | None = None,
    class_dir: Path | None = None,
    progress: bool = False,
    atom_budget: int = RECIPE_BUDGET,
    atoms: dict | None = None,
    form: str = DEFAULT_FORM,
):
    """One run of the project's trainer on the testbed pipeline; the adapter stays in ``pipe``."""
    from atomtune.workflows.train import TrainSettings, train

    settings = TrainSettings(
        instance_data=str(instance_dir),
        instance_prompt=prompt,
        token=STYLE_TOKEN if STYLE_TOKEN in prompt.split() else TOKEN,
        output_dir=str(out_dir),
        pretrained="digits",
        method=method,
        form=form,
        num_atoms=num_atoms,
        atom_budget=atom_budget,
        atoms=dict(atoms or {}),
        learning_rate=learning_rate,
        max_steps=steps,
        batch_size=len(list(Path(instance_dir).glob("*.png"))),
        seed=seed,
        class_prompt=class_prompt,
        class_data=None if class_dir is None else str(class_dir),
        num_class_images=len(list(Path(class_dir).glob("*.png"))) if class_dir else 20,
        sample_steps=SAMPLE_STEPS,
        guidance_scale=GUIDANCE,
    )
    return train(settings, pipe=pipe, progress=progress)


def sheet(images: torch.Tensor, prompts: int, seeds: int):
    """Prompts as rows (at most 25), seeds as columns, 3x enlarged."""
    from atomtune.diffusion.images import grid

    pil = to_pil(images)
    rows = [pil[i * seeds : (i + 1) * seeds] for i in range(min(prompts, 25))]
    picture = grid(rows)
    return picture.resize((picture.width * 3, picture.height * 3), 0)


def adapter_megabytes(adapter_dir: Path) -> float:
    return sum(f.stat().st_size for f in Path(adapter_dir).glob("*.safetensors")) / 2**20


def word(digit: int) -> str:
    return WORDS[digit]
