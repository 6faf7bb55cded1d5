"""Evaluation on the DreamBooth benchmark: DINO, CLIP-I and CLIP-T per subject and per method.

- ``manifest``: ``manifest.json``, what a generation folder holds (file, subject, prompt, seed, method).
- ``prompts``: the dataset's subjects, classes and 25 prompts per kind; ``strip_token``.
- ``metrics``: ``Evaluator`` (batched, on the GPU when present) and ``load_evaluator``.
- ``evaluate``: score a generation folder; results JSON and markdown table.
- ``runner``: ``run_benchmark``: train → generate → evaluate per (subject, method), resumable.
- ``dit``: the default ``train_and_generate`` (atomtune's DiT workflow, PixArt).
- ``tiny``: tiny DINO-style ViT and CLIP built from configs, for tests and offline smoke runs.
- ``cli``: ``add_eval_subcommands``: ``atomtune eval`` and ``atomtune benchmark-dreambooth``.

transformers and the diffusion workflows are imported when used, not when this package is.
"""

from atomtune.evaluation.evaluate import evaluate_folder, markdown_table, write_results
from atomtune.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO, Evaluator, load_evaluator
from atomtune.evaluation.prompts import load_dreambooth, strip_token
from atomtune.evaluation.runner import BenchmarkJob, run_benchmark, synthetic_train_and_generate
from atomtune.workflows.manifest import ImageRecord, Manifest, read_manifest, write_manifest

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "BenchmarkJob",
    "Evaluator",
    "ImageRecord",
    "Manifest",
    "evaluate_folder",
    "load_dreambooth",
    "load_evaluator",
    "markdown_table",
    "read_manifest",
    "run_benchmark",
    "strip_token",
    "synthetic_train_and_generate",
    "write_manifest",
    "write_results",
]
