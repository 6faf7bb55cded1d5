"""``atomtune eval`` and ``atomtune benchmark-dreambooth``: registered by ``add_eval_subcommands``.

Both raise ``AtomtuneError`` for every user error; the main CLI prints it as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from atomtune.errors import AtomtuneError
from atomtune.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO
from atomtune.validation import COUNT, SEED, check_output_not_input, device_option


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise AtomtuneError(f"expected comma-separated names, got {text!r}")
    return names


def _key_values(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise AtomtuneError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


def _evaluator_factory(args: argparse.Namespace):
    def make(device=None):
        device = args.device or device
        if args.tiny_models:
            from atomtune.evaluation.tiny import tiny_evaluator

            return tiny_evaluator(device=device, batch_size=args.batch_size, progress=not args.quiet)
        from atomtune.evaluation.metrics import load_evaluator

        return load_evaluator(
            args.dino_model,
            args.clip_model,
            device=device,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )

    return make


def _model_names(args: argparse.Namespace) -> dict[str, str]:
    if args.tiny_models:
        return {"dino": "tiny-dino (random weights)", "clip": "tiny-clip (random weights)"}
    return {"dino": str(args.dino_model), "clip": str(args.clip_model)}


def _eval(args: argparse.Namespace) -> None:
    from atomtune.evaluation.evaluate import evaluate_folder, write_results
    from atomtune.workflows.manifest import read_manifest

    read_manifest(args.generated)  # a missing or broken folder fails before models load
    out = Path(args.out) if args.out else Path(args.generated) / "eval.json"
    for written in (out, out.with_suffix(".md")):  # the results and their table must not replace the manifest
        check_output_not_input(written, (Path(args.generated) / "manifest.json",), "--out")
    evaluator = _evaluator_factory(args)()
    results = evaluate_folder(
        args.generated,
        args.real,
        evaluator,
        token=args.token,
        subjects=_names(args.subjects),
        methods=_names(args.methods),
    )
    table = write_results(results, out)
    print(table.read_text(), end="")
    print(f"wrote {out} and {table}")


def _benchmark(args: argparse.Namespace) -> None:
    from functools import partial

    from atomtune.evaluation.dit import dit_train_and_generate
    from atomtune.evaluation.runner import run_benchmark, synthetic_train_and_generate

    check_output_not_input(args.out, (args.dataset,))
    settings: dict[str, Any] = {"generator": args.generator, "metrics": _model_names(args)}
    if args.generator == "synthetic":
        train_and_generate = synthetic_train_and_generate
    else:
        from atomtune.evaluation.dit import check_options

        train_opts = _key_values(args.train_arg, "--train-arg")
        gen_opts = _key_values(args.generate_arg, "--generate-arg")
        check_options(train_opts, gen_opts)  # before any subject is trained or anything written
        settings.update(
            pretrained=args.pretrained,
            train=train_opts,
            generate=gen_opts,
            prior_preservation=args.prior_preservation,
        )
        train_and_generate = partial(
            dit_train_and_generate,
            pretrained=args.pretrained,
            train_options=train_opts,
            generate_options=gen_opts,
            prior_preservation=args.prior_preservation,
            progress=not args.quiet,
        )
    results = run_benchmark(
        args.dataset,
        train_and_generate,
        _evaluator_factory(args),
        args.out,
        subjects=_names(args.subjects),
        methods=_names(args.methods) or ["atoms"],
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        token=args.token or "sks",
        settings=settings,
        models=_model_names(args),
        progress=not args.quiet,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        out = Path(args.out)
        print((out / "results.md").read_text(), end="")
        done = results["benchmark"]
        print(
            f"{done['finished']}/{done['planned']} (subject, method) pairs done; wrote {out / 'results.json'}"
        )


def _metric_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--dino-model",
        default=DEFAULT_DINO,
        help="hub id or local folder of the DINO ViT (default: %(default)s, DreamBooth's ViT-S/16)",
    )
    g.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP,
        help="hub id or local folder of the CLIP model (default: %(default)s)",
    )
    g.add_argument(
        "--tiny-models",
        action="store_true",
        help="tiny random-weight DINO and CLIP built in-process (offline smoke runs; scores mean nothing)",
    )
    g.add_argument(
        "--device",
        type=device_option,
        default=None,
        help="device for the metric models (default: cuda if present)",
    )
    g.add_argument(
        "--batch-size", type=COUNT, default=32, help="images per forward pass (default: %(default)s)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_subcommands(subparsers: Any) -> None:
    """Register ``eval`` and ``benchmark-dreambooth`` on the main parser's subparsers."""
    p = subparsers.add_parser(
        "eval",
        help="DINO, CLIP-I and CLIP-T of generated images against the subjects' real images",
        description="Score a generation folder (images + manifest.json, as atomtune generate writes "
        "them) per method and subject; writes JSON and a markdown table.",
    )
    p.add_argument("generated", help="generation folder holding manifest.json")
    p.add_argument(
        "--real",
        required=True,
        help="folder with one sub-folder of real images per subject (the DreamBooth dataset/ folder)",
    )
    p.add_argument("--out", default=None, help="results JSON (default: GENERATED/eval.json; .md beside it)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects to score (default: all)")
    p.add_argument("--methods", default=None, help="comma-separated methods to score (default: all)")
    p.add_argument(
        "--token", default=None, help="unique token stripped for CLIP-T (default: the manifest's, else sks)"
    )
    _metric_options(p)
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "benchmark-dreambooth",
        help="train, generate and evaluate on DreamBooth subjects; resumable, JSON + markdown",
        description="For each subject and method: fine-tune on the subject's images, generate the "
        "dataset's 25 prompts x N images, score DINO / CLIP-I / CLIP-T. Rerun with the same --out to "
        "resume. Several GPUs: accelerate launch -m atomtune.cli benchmark-dreambooth ...",
    )
    p.add_argument("--dataset", required=True, help="the DreamBooth dataset/ folder (or the repo holding it)")
    p.add_argument("--out", required=True, help="output folder (reuse it to resume)")
    p.add_argument("--subjects", default=None, help="comma-separated subject names (default: all 30)")
    p.add_argument("--methods", default="atoms", help="comma-separated methods (default: %(default)s)")
    p.add_argument("--images-per-prompt", type=COUNT, default=4, help="default: %(default)s, as DreamBooth")
    p.add_argument("--seed", type=SEED, default=0, help="images use seeds SEED, SEED+1, ... (default: 0)")
    p.add_argument("--token", default="sks", help="unique token of the subject (default: %(default)s)")
    p.add_argument(
        "--generator",
        choices=("dit", "synthetic"),
        default="dit",
        help="dit: atomtune's DiT train + generate workflows; synthetic: noisy copies of the real "
        "images, no model (smoke runs of the layout). Default: %(default)s",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="base pipeline for --generator dit: hub id, local folder, or 'tiny' (default: the workflows')",
    )
    p.add_argument(
        "--train-arg",
        action="append",
        metavar="KEY=VALUE",
        help="a setting of atomtune train, e.g. max_steps=400 or mixed_precision=bf16 (repeatable)",
    )
    p.add_argument(
        "--generate-arg",
        action="append",
        metavar="KEY=VALUE",
        help="steps=20, guidance_scale=4.5, resolution=N (default: the model's), negative_prompt=TEXT",
    )
    p.add_argument(
        "--prior-preservation",
        action="store_true",
        help="train with the class prompt ('a photo of dog') and base-model class images, as DreamBooth",
    )
    _metric_options(p)
    p.set_defaults(func=_benchmark)
