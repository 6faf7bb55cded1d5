"""Score a generation folder against the subjects' real images; results as JSON and a markdown table.

Results (``atomtune eval``'s JSON, and the benchmark's ``results.json``)::

    {"format": "atomtune-dreambooth-eval", "format_version": 1,
     "models": {"dino": "facebook/dino-vits16", "clip": "openai/clip-vit-base-patch32"},
     "unique_token": "sks",
     "methods": {"atoms": {"mean": {"dino": .., "clip_i": .., "clip_t": .., "subjects": 2, "images": 200},
                           "subjects": {"dog": {"dino": .., "clip_i": .., "clip_t": .., "images": 100,
                                                "real_images": 5, "prompts": {...}}, ...}}}}

A method's mean is the mean of its subjects' scores (each subject weighs the same).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atomtune.errors import AtomtuneError
from atomtune.evaluation.metrics import METRICS, Evaluator
from atomtune.evaluation.prompts import DEFAULT_TOKEN, PROMPTS_FILE
from atomtune.io import atomic_write, list_images
from atomtune.workflows.manifest import read_manifest

RESULTS_FORMAT = "atomtune-dreambooth-eval"
RESULTS_VERSION = 1
LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def real_images(real_root: str | Path, subject: str) -> list[Path]:
    """The real images of ``subject``: ``REAL/SUBJECT/*`` (``REAL`` = a DreamBooth ``dataset/`` folder
    or the repository holding it, or any folder with one sub-folder per subject)."""
    root = Path(real_root)
    if not root.is_dir():
        raise AtomtuneError(f"real-image folder not found: {root}")
    if not (root / PROMPTS_FILE).is_file() and (root / "dataset" / PROMPTS_FILE).is_file():
        root = root / "dataset"
    folder = root / subject
    if not folder.is_dir():
        raise AtomtuneError(f"no real images for subject {subject!r}: folder {folder} not found")
    images = list_images(folder, "real images", allow_empty=True)
    if not images:
        raise AtomtuneError(f"no real images for subject {subject!r}: {folder} holds no image files")
    return images


def summarize(subjects: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over subjects, with the number of subjects and images."""
    if not subjects:
        return {**dict.fromkeys(METRICS), "subjects": 0, "images": 0}
    mean = {m: sum(s[m] for s in subjects.values()) / len(subjects) for m in METRICS}
    return {**mean, "subjects": len(subjects), "images": sum(s["images"] for s in subjects.values())}


def assemble(
    per_method: Mapping[str, Mapping[str, Mapping[str, Any]]],
    models: Mapping[str, str],
    token: str,
    **extra: Any,
) -> dict[str, Any]:
    """The results object from ``{method: {subject: scores}}``."""
    return {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_VERSION,
        "models": dict(models),
        "unique_token": token,
        **extra,
        "methods": {
            method: {"mean": summarize(subjects), "subjects": dict(subjects)}
            for method, subjects in per_method.items()
        },
    }


def evaluate_folder(
    folder: str | Path,
    real_root: str | Path,
    evaluator: Evaluator,
    token: str | None = None,
    subjects: list[str] | None = None,
    methods: list[str] | None = None,
) -> dict[str, Any]:
    """DINO, CLIP-I and CLIP-T per (method, subject) of a generation folder (see ``manifest.py``).

    ``token`` (the word stripped from prompts for CLIP-T) defaults to the manifest's
    ``metadata.unique_token``, else ``sks``. ``subjects``/``methods`` restrict what is scored.
    """
    manifest = read_manifest(folder)
    token = token or manifest.metadata.get("unique_token") or DEFAULT_TOKEN
    groups = manifest.groups()
    for what, wanted, have in (
        ("subject", subjects, {s for _, s in groups}),
        ("method", methods, {m for m, _ in groups}),
    ):
        missing = sorted(set(wanted or ()) - have)
        if missing:
            raise AtomtuneError(f"{manifest.folder}: no images of {what}(s) {', '.join(missing)}")
    if not groups:
        raise AtomtuneError(f"{manifest.folder / 'manifest.json'} lists no images")
    reals: dict[str, list[Path]] = {}
    per_method: dict[str, dict[str, Any]] = {}
    for (method, subject), records in groups.items():
        if (subjects and subject not in subjects) or (methods and method not in methods):
            continue
        if subject not in reals:
            reals[subject] = real_images(real_root, subject)
        scores = evaluator.score(
            [manifest.path(r) for r in records], [r.prompt for r in records], reals[subject], token
        )
        per_method.setdefault(method, {})[subject] = scores
    return assemble(per_method, evaluator.names, token, generations=str(manifest.folder))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def markdown_table(results: Mapping[str, Any], classes: Mapping[str, str] | None = None) -> str:
    """One row per (method, subject), then each method's mean row in bold."""
    head = ["method", "subject"] + (["class"] if classes else []) + ["images", "DINO", "CLIP-I", "CLIP-T"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * (len(head) - 4) + ["---:"] * 4) + "|",
    ]
    for method, block in results["methods"].items():
        for subject, s in block["subjects"].items():
            cls = [classes.get(subject, "")] if classes else []
            row = [method, subject, *cls, str(s["images"]), *(_fmt(s[m]) for m in METRICS)]
            lines.append("| " + " | ".join(row) + " |")
        mean = block["mean"]
        cls = [""] if classes else []
        label = f"**mean of {mean['subjects']} subject{'s' if mean['subjects'] != 1 else ''}**"
        row = [
            f"**{method}**",
            label,
            *cls,
            str(mean["images"]),
            *(f"**{_fmt(mean[m])}**" if mean[m] is not None else "" for m in METRICS),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    results: Mapping[str, Any], json_path: str | Path, classes: Mapping[str, str] | None = None
) -> Path:
    """Write the results JSON and, beside it, the markdown table (``.md``); both atomically."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    table = markdown_table(results, classes)
    atomic_write(json_path, lambda p: p.write_text(text))
    atomic_write(json_path.with_suffix(".md"), lambda p: p.write_text(table))
    return json_path.with_suffix(".md")
