"""``atomtune train``: its flags, read into ``TrainSettings`` (with a YAML/TOML settings file under them)."""

from __future__ import annotations

import argparse

from atomtune.cli.options import ATOM_FLAGS
from atomtune.diffusion.methods import DEFAULT_ATOM_BUDGET, FORMS
from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED, TINY


def _train(args: argparse.Namespace) -> None:
    from atomtune.workflows.train import TrainSettings, read_settings_file, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "quiet")}
    atom_overrides = {k: given.pop(k) for k in ATOM_FLAGS if given.get(k) is not None}
    for k in ATOM_FLAGS:
        given.pop(k, None)
    if atom_overrides:
        file_atoms = read_settings_file(args.config).get("atoms", {}) if args.config else {}
        given["atoms"] = {**(file_atoms if isinstance(file_atoms, dict) else {}), **atom_overrides}
    settings = TrainSettings.build(args.config, **given)
    result = train(settings, progress=not args.quiet)
    if not result.is_main_process:
        return
    last = result.history[-1] if result.history else {}
    print(
        f"trained {settings.method} for {result.steps} steps in {result.seconds:.1f}s"
        + (f", final loss {last['loss']:.4f}" if last else "")
    )
    print(f"wrote the adapter in {result.adapter_dir} (with training.json and README.md)")
    if result.class_images:
        print(f"class images: {len(result.class_images)} in {result.class_images[0].parent}")
    if result.samples:
        print(f"samples: {', '.join(str(p) for p in result.samples)}")
    kept = [p for p in result.checkpoints if p.is_dir()]  # older ones go (--checkpoints-total-limit)
    if kept:
        print(f"checkpoints: {', '.join(str(p) for p in kept)}")


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="concept customization (DreamBooth-style) with atoms, lora, dora or oft",
        description="Fine-tune a diffusion transformer on a few instance images. Flags override the "
        "settings file (--config, YAML or TOML, keys as the flag names).",
    )
    p.add_argument("--config", default=None, help="settings file (.yaml, .yml or .toml)")
    p.add_argument(
        "--pretrained", default=None, help=f"hub id, folder or '{TINY}' (default: {DEFAULT_PRETRAINED})"
    )
    p.add_argument("--variant", default=None)
    p.add_argument("--dtype", default=None, help="weights dtype (default: auto, from --mixed-precision)")
    p.add_argument("--local-files-only", action="store_true", default=None)
    p.add_argument("--instance-data", default=None, help="folder of 4-6 images of the concept")
    p.add_argument("--instance-prompt", default=None, help="e.g. 'a sks dog'")
    p.add_argument(
        "--token", default=None, help="the unique token the instance prompt must contain (default: sks)"
    )
    p.add_argument("--class-prompt", default=None, help="e.g. 'a dog': turns on prior preservation")
    p.add_argument("--class-data", default=None, help="class images folder (default: OUTPUT/class_images)")
    p.add_argument("--num-class-images", type=int, default=None, help="(default: 50; generated when missing)")
    p.add_argument("--prior-loss-weight", type=float, default=None)
    p.add_argument("--method", default=None, help="atoms, lora, dora or oft (default: atoms)")
    p.add_argument(
        "--form",
        choices=FORMS,
        default=None,
        help="atoms on each projection the host's LoRA adapts (projections, the default) or the paper's "
        "update of the attention modules' value path (attention)",
    )
    p.add_argument(
        "--num-atoms",
        type=_num_atoms,
        default=None,
        help="atoms per adapted module to start with, or 'parity': as many parameters as LoRA --rank on "
        "the host's LoRA targets (default: 150 per projection; with --form attention, parity: 64 per "
        "module on PixArt-Σ, 83 on SD3.5-M, 128 on Flux.1, 48 on Sana)",
    )
    p.add_argument(
        "--atom-budget",
        type=int,
        default=None,
        help="atoms kept per module: the rest are cut by contribution during training "
        f"(default: {DEFAULT_ATOM_BUDGET}; 0 keeps all)",
    )
    p.add_argument("--rank", type=int, default=None, help="LoRA/DoRA rank (default: 16)")
    p.add_argument("--oft-r", type=int, default=None, help="OFT blocks (default: 4)")
    for flag, kind in ATOM_FLAGS.items():
        p.add_argument(
            "--" + flag.replace("_", "-"), type=kind, default=None, help=f"atoms: AtomConfig.{flag}"
        )
    p.add_argument("--optimizer", default=None, help="came or adamw (default: came)")
    p.add_argument("--learning-rate", "--lr", type=float, default=None, help="(default: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None, help="(default: 15)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (overrides epochs)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="(default: 1)")
    p.add_argument("--resolution", type=int, default=None, help="(default: the model's)")
    p.add_argument("--mixed-precision", default=None, help="no, bf16 or fp16 (default: no)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--sample-every", type=int, default=None, help="write sample images every N steps")
    p.add_argument("--sample-prompt", dest="sample_prompts", action="append", default=None)
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="write a checkpoint every N steps")
    p.add_argument(
        "--checkpoints-total-limit",
        type=int,
        default=None,
        help="checkpoints kept, the newest; older ones are deleted once a new one is complete "
        "(default: 3; 0 keeps every one)",
    )
    p.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in OUTPUT/checkpoints")
    p.add_argument("--output-dir", "--out", default=None, help="where adapter, samples, checkpoints go")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)


# -- generate -----------------------------------------------------------------------------------


def _num_atoms(text: str) -> int | str:
    """``--num-atoms``: a count or ``parity``."""
    if text == "parity":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a count or 'parity', got {text!r}") from None
