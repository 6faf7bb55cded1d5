"""``atomtune testbed …``: pretrain the digit model, train the judges, look at what the model draws."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from atomtune.diffusion.methods import DEFAULT_ATOM_BUDGET, DEFAULT_FORM, DEFAULT_NUM_ATOMS
from atomtune.validation import COUNT, SEED, device_option, option

if TYPE_CHECKING:
    from atomtune.testbed.bench import BenchSettings

RECIPE_NUM_ATOMS, RECIPE_BUDGET = DEFAULT_NUM_ATOMS[DEFAULT_FORM], DEFAULT_ATOM_BUDGET  # the testbed's recipe


def _pretrain(args: argparse.Namespace) -> None:
    from atomtune.testbed.pretrain import PretrainSettings, pretrain

    overrides = {
        f.name: getattr(args, f.name) for f in fields(PretrainSettings) if getattr(args, f.name) is not None
    }
    weights = pretrain(PretrainSettings(**overrides), args.out, not args.quiet, args.device, args.features)
    print(f"wrote {weights} (copy it to atomtune/testbed/weights/ to ship it)")


def _judges(args: argparse.Namespace) -> None:
    from atomtune.testbed.judges import train_and_save_judge

    accuracy = train_and_save_judge(args.out, epochs=args.epochs, seed=args.seed)
    print(f"wrote {args.out}; accuracy on held-out real digits: {accuracy:.4f}")


def _preview(args: argparse.Namespace) -> None:
    """Draw every pretrained digit in every color, judge them, write a grid and the scores."""
    import torch
    from PIL import Image

    from atomtune.io import atomic_write
    from atomtune.testbed.digit_pipeline import digit_pipeline
    from atomtune.testbed.digits import COLORS, PLACES, Attributes
    from atomtune.testbed.judges import alignment, extract_glyph, load_classifier

    digits = [d for d in range(10) if d != args.holdout_digit]
    attrs = [Attributes(d, c, "large", "in the center") for d in digits for c in COLORS]
    attrs += [Attributes(d, c, "small", p) for d in digits for c, p in zip(COLORS, PLACES, strict=True)]
    images = digit_pipeline(args.weights)([a.caption() for a in attrs], list(range(len(attrs))))
    with torch.no_grad():
        predicted = load_classifier()(extract_glyph(images)).argmax(1)
    truth = torch.tensor([a.digit for a in attrs])
    scores = {
        "digit_accuracy": (predicted == truth).float().mean().item(),
        "alignment": alignment(images, attrs).mean().item(),
        "images": len(attrs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(digits) * len(COLORS)
    grid = (
        images[:n]
        .view(len(digits), len(COLORS), 3, 24, 24)
        .permute(0, 3, 1, 4, 2)
        .reshape(len(digits) * 24, -1, 3)
    )
    picture = Image.fromarray((grid.numpy() * 255).astype("uint8")).resize(
        (grid.shape[1] * 4, grid.shape[0] * 4), 0
    )
    atomic_write(out / "preview.png", lambda p: picture.save(p, format="PNG"))
    atomic_write(out / "preview.json", lambda p: p.write_text(json.dumps(scores, indent=2) + "\n"))
    print(json.dumps(scores))


def bench_settings(args: argparse.Namespace) -> BenchSettings:
    """``BenchSettings`` from ``testbed bench``'s options; an option left out keeps the recipe's value."""
    from atomtune.cli.options import seed_list
    from atomtune.testbed.bench import BenchSettings, parse_list
    from atomtune.validation import check_number

    learning_rates = parse_list(args.learning_rates, float)
    for lr in learning_rates:
        check_number("--learning-rates", lr, above=0)
    return BenchSettings(
        methods=parse_list(args.methods, str),
        seeds=tuple(seed_list(args.seeds, "--seeds")),
        learning_rates=learning_rates,
        steps=args.steps,
        **({} if args.num_atoms is None else {"num_atoms": args.num_atoms}),
        **({} if args.atom_budget is None else {"atom_budget": args.atom_budget}),
        eval_seeds=tuple(seed_list(args.eval_seeds, "--eval-seeds")),
        prompts=args.prompts,
        prior_per_digit=args.prior_per_digit,
        captions=not args.no_captions,
        topk=not args.no_topk,
        merge=not args.no_merge,
    )


def _bench(args: argparse.Namespace) -> None:
    from atomtune.testbed.bench import markdown, run_bench

    report = run_bench(bench_settings(args), args.out, args.weights, not args.quiet)
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'bench.md'} and bench.json")


def _edit_bench(args: argparse.Namespace) -> None:
    import time

    from atomtune.cli.options import int_list, seed_list
    from atomtune.testbed.bench import parse_list
    from atomtune.testbed.edit_bench import EditBenchSettings, run_edit_bench
    from atomtune.testbed.edit_report import markdown

    given = {
        "methods": parse_list(args.methods, str) if args.methods else None,
        "digits": tuple(int_list(args.digits, "--digits")) if args.digits else None,
        "seeds": tuple(seed_list(args.seeds, "--seeds")) if args.seeds else None,
        "learning_rates": parse_list(args.learning_rates) if args.learning_rates else None,
        "steps": args.steps,
        "num_atoms": args.num_atoms,
        "atom_budget": args.atom_budget,
        "sample_steps": args.sample_steps,
    }
    settings = EditBenchSettings(**{k: v for k, v in given.items() if v is not None})
    start = time.perf_counter()
    report = run_edit_bench(settings, args.out, args.weights, not args.quiet)
    print(markdown(report))
    print(
        f"wrote {Path(args.out) / 'edit_bench.md'}, edit_bench.json, edit_curves.png, edit_grid.png "
        f"({time.perf_counter() - start:.0f} s wall this call; {report['cpu_seconds']:.0f} s CPU in all runs)"
    )


def _demo(args: argparse.Namespace) -> None:
    from atomtune.testbed.demo import DemoSettings, run_demo

    summary = run_demo(args.out, DemoSettings(steps=args.steps, seed=args.seed), not args.quiet)
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/: images.png, heatmap.png, sweep.png, summary.md ({summary['seconds']:.0f} s)")


DIGIT = option(int, minimum=0, maximum=9)


def register(sub) -> None:
    """Add ``demo`` and ``testbed`` with its sub-commands to the main parser's sub-parsers."""
    p = sub.add_parser("demo", help="the main job: teach the shipped digit model a new digit with atoms")
    p.add_argument("--out", default="atomtune-demo", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300)  # DemoSettings checks it, before anything runs
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_demo)

    parser = sub.add_parser("testbed", help="the offline digits testbed: pretrain, judges, preview")
    tb = parser.add_subparsers(dest="testbed_command", required=True)

    p = tb.add_parser("pretrain", help="pretrain the digit DiT (resumes from --out's last checkpoint)")
    p.add_argument("--out", required=True, help="run folder: checkpoints and digit_dit.safetensors")
    p.add_argument("--steps", type=int)  # PretrainSettings checks these, before anything runs
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--holdout-digit", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--heads", type=int, help="attention heads (x 32 wide)")
    p.add_argument("--layers", type=int, help="transformer blocks")
    p.add_argument("--patch-size", type=int, choices=(2, 3, 4))
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"))
    p.add_argument("--device", type=device_option, default="cpu")
    p.add_argument("--features", help="caption features file (safetensors), instead of running MiniLM")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_pretrain)
    for name in ("caption_dropout", "ema", "warmup"):
        p.set_defaults(**{name: None})

    p = tb.add_parser("judges", help="train the digit classifier used as a judge")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--epochs", type=COUNT, default=30)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=_judges)

    p = tb.add_parser("bench", help="mini-DreamBooth: atoms vs LoRA, DoRA, OFT on the held-out digit")
    p.add_argument("--out", required=True, help="results folder (a rerun resumes it)")
    p.add_argument("--methods", default="atoms,lora,dora,oft")
    p.add_argument("--seeds", default="0,1,2", help="report seeds (comma-separated)")
    p.add_argument(
        "--learning-rates", default="3e-5,1e-4,3e-4,1e-3,3e-3", help="the search grid, same for all"
    )
    p.add_argument("--steps", type=COUNT, default=600)
    p.add_argument("--num-atoms", type=COUNT, help=f"atoms per projection (default: {RECIPE_NUM_ATOMS})")
    p.add_argument(
        "--prior-per-digit", type=option(int, minimum=0), default=4,
        help="prior preservation: the pretrained model's drawings of each other digit (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--atom-budget",
        type=COUNT,
        default=None,
        help=f"atoms kept per projection (default: {RECIPE_BUDGET})",
    )
    p.add_argument("--eval-seeds", default="0,1", help="samples per prompt")
    p.add_argument("--prompts", help="a file of prompts, one per line, {} = the concept")
    p.add_argument("--weights", help="digit_dit.safetensors (default: the shipped one)")
    p.add_argument(
        "--no-captions", action="store_true",
        help='train every instance image under "a sks digit" instead of its own caption',
    )  # fmt: skip
    p.add_argument("--no-topk", action="store_true", help="skip the atoms-removal curve")
    p.add_argument("--no-merge", action="store_true", help="skip the concept + style merge")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_bench)

    p = tb.add_parser(
        "edit-bench",
        help="editing on one image: atoms' top-k removal vs random, LoRA/DoRA scale and rank, OFT",
    )
    p.add_argument("--out", required=True, help="results folder (a rerun resumes it)")
    p.add_argument("--methods", help="default: atoms,lora,dora,oft")
    p.add_argument("--digits", help="one report source per digit (default: 9,2,9,5,9,7)")
    p.add_argument("--seeds", help="report seeds (default: 0,1,2)")
    p.add_argument(
        "--learning-rates",
        help="the grid every method chooses from; every rate is also reported (default: 1e-4,3e-4,1e-3)",
    )
    p.add_argument("--steps", type=COUNT, help="training steps on the one image (default: 60)")
    p.add_argument("--num-atoms", type=COUNT, help=f"atoms per projection (default: {RECIPE_NUM_ATOMS})")
    p.add_argument(
        "--atom-budget", type=COUNT, help=f"atoms kept per projection in training (default: {RECIPE_BUDGET})"
    )
    p.add_argument("--sample-steps", type=COUNT, help="sampling steps per drawing (default: 10)")
    p.add_argument("--weights", help="digit_dit.safetensors (default: the shipped one)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_edit_bench)

    p = tb.add_parser("preview", help="draw and judge every digit the model was pretrained on")
    p.add_argument("--weights", help="digit_dit.safetensors (default: the shipped one)")
    p.add_argument("--holdout-digit", type=DIGIT, default=9)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_preview)
