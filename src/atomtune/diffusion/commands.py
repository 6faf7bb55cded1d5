"""The diffusion subcommands of the ``atomtune`` CLI: train, generate, atoms, edit, merge, tiny-pipeline.

Each handler only turns flags into a call of the Python function that does the work and prints what
was written; every user error is an ``AtomtuneError`` (one line on stderr, exit code 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ..errors import AtomtuneError
from ..validation import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED, check_seed, device_option
from .pipeline import DEFAULT_PRETRAINED, TINY


def float_list(text: str) -> list[float]:
    """``"0.25,0.5"`` → ``[0.25, 0.5]`` (an argparse type)."""
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from exc


ATOM_FLAGS = {  # flag → AtomConfig field, for the atoms method's most used settings
    "prune_at": float_list,
    "lr_exponent": float,
    "prune_by": str,
    "shrinkage": str,
    "lambda_init": float,
    "sparsity_weight": float,
    "orthogonality_weight": float,
    "attention": str,
    "placement": str,
}


def int_list(text: str | None, what: str, minimum: int | None = None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise AtomtuneError(f"{what} must be comma-separated integers (e.g. 0,1,2), got {text!r}") from exc
    if minimum is not None and any(v < minimum for v in values):
        raise AtomtuneError(f"{what} must be integers >= {minimum}, got {text!r}")
    return values


def seed_list(text: str | None, what: str = "--seeds") -> list[int] | None:
    """Comma-separated seeds, each in 0 .. 2**32-1."""
    values = int_list(text, what)
    for value in values or []:
        check_seed(what, value)
    return values


def _loading(p: argparse.ArgumentParser, default: str | None = DEFAULT_PRETRAINED) -> None:
    p.add_argument(
        "--pretrained",
        default=default,
        help=f"hub id, local pipeline folder, or '{TINY}' (a tiny in-process pipeline) (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: %(default)s)"
    )
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument(
        "--device", type=device_option, default=None, help="cuda, cpu, ... (default: cuda if available)"
    )
    p.add_argument("--local-files-only", action="store_true", help="never try the network")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=COUNT, default=20, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=NON_NEGATIVE, default=4.5, help="(default: %(default)s)")
    p.add_argument("--resolution", type=COUNT, default=None, help="image size (default: the model's)")


def _loading_kwargs(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "variant": args.variant,
        "device": args.device,
        "local_files_only": args.local_files_only,
        "progress": not args.quiet,
    }


# -- train --------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> None:
    from .trainer import TrainSettings, read_settings_file, train

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


def _add_train(sub) -> None:
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
        "--num-atoms", type=int, default=None, help="atoms per attention module to start with (default: 64)"
    )
    p.add_argument(
        "--atom-budget",
        type=int,
        default=None,
        help="atoms kept per module: the rest are cut by contribution during training (default: 6; 0 keeps all)",
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
def _generate(args: argparse.Namespace) -> None:
    from .data import read_prompts
    from .generate import generate

    prompts = read_prompts(args.prompt, args.prompts_file)
    height = args.height or args.resolution
    result = generate(
        args.pretrained,
        prompts,
        args.out,
        adapters=args.adapter,
        num_images=args.num_images,
        seed=args.seed,
        seeds=seed_list(args.seeds),
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=height,
        width=args.width or height,
        masks=args.masks,
        top_k=args.top_k,
        rankings=args.rankings,
        gains=args.gain,
        combine=args.combine,
        subject=args.subject,
        token=args.token,
        compile=args.compile,
        **_loading_kwargs(args),
    )
    print(
        f"wrote {len(result.images)} images, {result.grid}, images.json and manifest.json in {result.out_dir}"
    )


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with adapters, atom masks and gains")
    _loading(p)
    p.add_argument("--adapter", action="append", default=None, help="adapter folder (repeat for several)")
    p.add_argument("--combine", default="concat", help="several atom adapters: concat (exact) or sum")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--num-images", type=COUNT, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, help="first seed; image i uses seed+i")
    p.add_argument("--seeds", default=None, help="explicit seeds, comma-separated")
    _sampling(p)
    p.add_argument("--height", type=COUNT, default=None)
    p.add_argument("--width", type=COUNT, default=None)
    p.add_argument("--masks", default=None, help="JSON {module: [0/1 per atom]}")
    p.add_argument("--top-k", type=NON_NEGATIVE_INT, default=None, help="keep the top-k atoms per module")
    p.add_argument("--rankings", default=None, help="rankings.json of `atomtune atoms` for --top-k")
    p.add_argument(
        "--gain", action="append", default=None, help="MODULE:ATOM=GAIN, e.g. transformer_blocks.1.attn2:3=2"
    )
    p.add_argument(
        "--subject", default=None, help="subject name in manifest.json (default: the --out folder's name)"
    )
    p.add_argument("--token", default="sks", help="unique token, stripped from prompts by `atomtune eval`")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the transformer through torch.compile (the first image pays the compile time)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_generate)


# -- atoms --------------------------------------------------------------------------------------
def _atoms(args: argparse.Namespace) -> None:
    from .analysis import analyze
    from .data import read_prompts

    result = analyze(
        args.pretrained,
        args.adapter,
        args.out,
        prompts=read_prompts(args.prompt, args.prompts_file),
        seeds=seed_list(args.seeds),
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        do_sweep=args.sweep,
        sweep_prompt=args.sweep_prompt,
        sweep_seed=args.sweep_seed,
        **_loading_kwargs(args),
    )
    print(f"wrote {result.rankings} and {result.heatmap}")
    mean = result.sparsity["mean"]
    print(
        f"per module (mean): {mean['live_atoms']:.1f} live atoms, {mean['zero_share']:.1%} of the "
        f"coefficients zero, {mean['active_per_token']:.1f} atoms active per token, "
        f"{mean['atoms_for_share']:.1f} atoms carry {result.sparsity['share']:.0%} of the contribution"
    )
    if result.sweep:
        print(f"wrote the sweep (k = {', '.join(map(str, result.ks))}): {result.sweep}")


def _add_atoms(sub) -> None:
    p = sub.add_parser("atoms", help="rank atoms over prompts and timesteps; heatmap; --sweep over top-k")
    _loading(p)
    p.add_argument("--adapter", required=True, help="an atoms adapter folder")
    p.add_argument(
        "--prompt", action="append", default=None, help="calibration prompt (default: the instance prompt)"
    )
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--seeds", default=None, help="calibration seeds, comma-separated (default: 0)")
    _sampling(p)
    p.add_argument("--sweep", action="store_true", help="generate with the top 1, 2, 4 … M atoms")
    p.add_argument("--sweep-prompt", default=None, help="(default: the first prompt)")
    p.add_argument("--sweep-seed", type=SEED, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_atoms)


# -- edit ---------------------------------------------------------------------------------------
def _edit(args: argparse.Namespace) -> None:
    from .edit import edit

    kwargs = _loading_kwargs(args)
    result = edit(
        args.pretrained,
        args.image,
        args.source_prompt,
        args.target_prompt or [],
        args.out,
        ks=int_list(args.ks, "--ks", minimum=0),
        epochs=args.epochs,
        num_atoms=args.num_atoms,
        learning_rate=args.learning_rate,
        resolution=args.resolution,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        mixed_precision=args.mixed_precision,
        **kwargs,
    )
    print(f"trained on the image: adapter in {result.adapter_dir}")
    print(
        f"wrote {result.grid} (columns: all atoms, k = {', '.join(map(str, result.ks))}, base) and edit.json"
    )


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="fine-tune on one image, generate edits keeping the top-k atoms")
    _loading(p)
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--source-prompt", required=True, help="what the image shows")
    p.add_argument("--target-prompt", action="append", help="the edit (repeat for several)")
    p.add_argument("--ks", default=None, help="atoms kept per module, comma-separated (default: 64,16,4,1)")
    p.add_argument("--epochs", type=COUNT, default=60, help="(default: %(default)s)")
    p.add_argument("--num-atoms", type=COUNT, default=256, help="(default: %(default)s)")
    p.add_argument("--learning-rate", "--lr", type=POSITIVE, default=1e-4)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--seed", type=SEED, default=0)
    _sampling(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_edit)


# -- merge --------------------------------------------------------------------------------------
def _merge(args: argparse.Namespace) -> None:
    from .data import read_prompts
    from .merging import merge

    result = merge(
        args.pretrained,
        args.concept,
        args.style,
        args.out,
        how=args.how,
        k=args.top_k,
        prompts=read_prompts(args.prompt, args.prompts_file),
        seeds=seed_list(args.seeds),
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        **_loading_kwargs(args),
    )
    print(result.table)
    print(f"wrote the merged adapter ({args.how}) in {result.adapter_dir} and {result.overlap_path}")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a concept and a style atoms adapter; report their atom overlap")
    _loading(p)
    p.add_argument("concept", help="concept adapter folder")
    p.add_argument("style", help="style adapter folder")
    p.add_argument("--how", default="sum", help="sum (the paper) or concat (exact) (default: %(default)s)")
    p.add_argument("--top-k", type=COUNT, default=None, help="atoms per module compared (default: M/8)")
    p.add_argument("--prompt", action="append", default=None, help="calibrate importance on prompts")
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--seeds", default=None)
    p.add_argument("--steps", type=COUNT, default=20)
    p.add_argument("--guidance-scale", type=NON_NEGATIVE, default=4.5)
    p.add_argument("--out", required=True, help="folder for the merged adapter")
    p.set_defaults(func=_merge)


# -- tiny-pipeline ------------------------------------------------------------------------------
def _tiny(args: argparse.Namespace) -> None:
    from .pipeline import tiny_pixart_pipeline

    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise AtomtuneError(f"{out} exists and is not empty")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = tiny_pixart_pipeline(seed=args.seed)
    pipe.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"wrote a tiny PixArt-Σ pipeline in {out}: use --pretrained {out}")


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny-pipeline", help="write a tiny PixArt-Σ pipeline folder (random weights, 32 px)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=_tiny)


def register(sub) -> None:
    """Add the diffusion subcommands to the CLI's subparsers."""
    for add in (_add_train, _add_generate, _add_atoms, _add_edit, _add_merge, _add_tiny):
        add(sub)
