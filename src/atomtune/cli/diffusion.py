"""The diffusion subcommands of the ``atomtune`` CLI: train, generate, atoms, edit, merge, tiny-pipeline.

Each handler only turns flags into a call of the Python function that does the work and prints what
was written; every user error is an ``AtomtuneError`` (one line on stderr, exit code 2).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from atomtune.cli.options import add_loading, add_sampling, int_list, loading_kwargs, seed_list
from atomtune.cli.train import register as register_train
from atomtune.errors import AtomtuneError
from atomtune.validation import (
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    SEED,
)


def _generate(args: argparse.Namespace) -> None:
    from atomtune.diffusion.data import read_prompts
    from atomtune.workflows.generate import GenerateSettings, generate

    prompts = read_prompts(args.prompt, args.prompts_file)
    height = args.height or args.resolution
    settings = GenerateSettings(
        prompts,
        args.out,
        pretrained=args.pretrained,
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
        first_only=args.first_only,
        subject=args.subject,
        token=args.token,
        compile=args.compile,
        **loading_kwargs(args),
    )
    result = generate(settings, progress=not args.quiet)
    print(
        f"wrote {len(result.images)} images, {result.grid}, images.json and manifest.json in {result.out_dir}"
    )


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with adapters, atom masks and gains")
    add_loading(p)
    p.add_argument("--adapter", action="append", default=None, help="adapter folder (repeat for several)")
    p.add_argument("--combine", default="concat", help="several atom adapters: concat (exact) or sum")
    p.add_argument(
        "--first-only",
        action="append",
        default=None,
        metavar="MODULE",
        help="with several adapters, modules where the first acts alone (a dotted part of their names: attn1.to_q)",
    )
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--num-images", type=COUNT, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, help="first seed; image i uses seed+i")
    p.add_argument("--seeds", default=None, help="explicit seeds, comma-separated")
    add_sampling(p)
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
    from atomtune.diffusion.data import read_prompts
    from atomtune.workflows.analyze import AnalyzeSettings, analyze

    settings = AnalyzeSettings(
        args.adapter,
        args.out,
        pretrained=args.pretrained,
        prompts=read_prompts(args.prompt, args.prompts_file),
        seeds=seed_list(args.seeds),
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        sweep=args.sweep,
        sweep_prompt=args.sweep_prompt,
        sweep_seed=args.sweep_seed,
        **loading_kwargs(args),
    )
    result = analyze(settings, progress=not args.quiet)
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
    add_loading(p)
    p.add_argument("--adapter", required=True, help="an atoms adapter folder")
    p.add_argument(
        "--prompt", action="append", default=None, help="calibration prompt (default: the instance prompt)"
    )
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--seeds", default=None, help="calibration seeds, comma-separated (default: 0)")
    add_sampling(p)
    p.add_argument("--sweep", action="store_true", help="generate with the top 1, 2, 4 … M atoms")
    p.add_argument("--sweep-prompt", default=None, help="(default: the first prompt)")
    p.add_argument("--sweep-seed", type=SEED, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_atoms)


# -- report -------------------------------------------------------------------------------------
def _report(args: argparse.Namespace) -> None:
    from atomtune.diffusion.data import read_prompts
    from atomtune.workflows.report import ReportSettings, report

    settings = ReportSettings(
        args.adapter,
        args.out,
        pretrained=args.pretrained,
        prompts=read_prompts(args.prompt, args.prompts_file),
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        ks=int_list(args.ks, "--ks", minimum=0),
        atoms_shown=args.atoms_shown,
        bands=args.bands,
        **loading_kwargs(args),
    )
    result = report(settings, progress=not args.quiet)
    shown = len(result.data["shown"])
    print(
        f"wrote {result.page} ({len(result.data['prompts'])} prompt(s) x ({len(result.data['ks'])} k values "
        f"+ 2 x {shown} atoms shown) images; open it in a browser) and {result.data_path}"
    )


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="one self-contained report.html: atom importance, where each atom acts, top-k slider"
    )
    add_loading(p)
    p.add_argument("--adapter", required=True, help="an atoms adapter folder")
    p.add_argument(
        "--prompt", action="append", default=None, help="prompt (repeat; default: the instance prompt)"
    )
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--seed", type=SEED, default=0)
    add_sampling(p)
    p.add_argument(
        "--ks", default=None, help="k values of the slider, comma-separated (default: 0, 1, 2, 4, … all)"
    )
    p.add_argument(
        "--atoms-shown", type=int, default=6, help="atoms drawn removed and doubled (default: %(default)s)"
    )
    p.add_argument("--bands", type=COUNT, default=3, help="bands of sampler steps for the maps (default: 3)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_report)


# -- edit ---------------------------------------------------------------------------------------
def _edit(args: argparse.Namespace) -> None:
    from atomtune.workflows.edit import edit

    kwargs = loading_kwargs(args)
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
        progress=not args.quiet,
        **kwargs,
    )
    print(f"trained on the image: adapter in {result.adapter_dir}")
    print(
        f"wrote {result.grid} (columns: all atoms, k = {', '.join(map(str, result.ks))}, base) and edit.json"
    )


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="fine-tune on one image, generate edits keeping the top-k atoms")
    add_loading(p)
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--source-prompt", required=True, help="what the image shows")
    p.add_argument("--target-prompt", action="append", help="the edit (repeat for several)")
    p.add_argument("--ks", default=None, help="atoms kept per module, comma-separated (default: 64,16,4,1)")
    p.add_argument("--epochs", type=COUNT, default=60, help="(default: %(default)s)")
    p.add_argument("--num-atoms", type=COUNT, default=64, help="atoms per projection (default: %(default)s)")
    p.add_argument("--learning-rate", "--lr", type=POSITIVE, default=1e-4)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--seed", type=SEED, default=0)
    add_sampling(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_edit)


# -- merge --------------------------------------------------------------------------------------
def _merge(args: argparse.Namespace) -> None:
    from atomtune.diffusion.data import read_prompts
    from atomtune.workflows.merge import merge

    result = merge(
        args.pretrained,
        args.concept,
        args.style,
        args.out,
        how=args.how,
        concept_only=args.concept_only,
        k=args.top_k,
        prompts=read_prompts(args.prompt, args.prompts_file),
        seeds=seed_list(args.seeds),
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        progress=not args.quiet,
        **loading_kwargs(args),
    )
    print(result.table)
    print(f"wrote the merged adapter ({args.how}) in {result.adapter_dir} and {result.overlap_path}")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a concept and a style atoms adapter; report their atom overlap")
    add_loading(p)
    p.add_argument("concept", help="concept adapter folder")
    p.add_argument("style", help="style adapter folder")
    p.add_argument("--how", default="sum", help="sum (the paper) or concat (exact) (default: %(default)s)")
    p.add_argument(
        "--concept-only",
        action="append",
        default=None,
        metavar="MODULE",
        help="modules where the merge keeps the concept alone (a dotted part of their names: attn1.to_q)",
    )
    p.add_argument("--top-k", type=COUNT, default=None, help="atoms per module compared (default: M/8)")
    p.add_argument("--prompt", action="append", default=None, help="calibrate importance on prompts")
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--seeds", default=None)
    p.add_argument("--steps", type=COUNT, default=20)
    p.add_argument("--guidance-scale", type=NON_NEGATIVE, default=4.5)
    p.add_argument("--out", required=True, help="folder for the merged adapter")
    p.set_defaults(func=_merge)


# -- tiny-pipeline ------------------------------------------------------------------------------
def _tiny_builders() -> dict[str, Any]:
    from atomtune.diffusion import tiny_hosts
    from atomtune.diffusion.pipeline import tiny_pixart_pipeline

    return {
        "pixart": ("PixArt-Σ", tiny_pixart_pipeline),
        "sd3": ("SD3", tiny_hosts.tiny_sd3_pipeline),
        "flux": ("Flux", tiny_hosts.tiny_flux_pipeline),
        "sana": ("Sana", tiny_hosts.tiny_sana_pipeline),
    }


def _tiny(args: argparse.Namespace) -> None:
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise AtomtuneError(f"{out} exists and is not empty")
    title, build = _tiny_builders()[args.host]
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = build(seed=args.seed)
    pipe.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"wrote a tiny {title} pipeline in {out}: use --pretrained {out}")


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny-pipeline", help="write a tiny pipeline folder (random weights, 32 px)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--host", choices=("pixart", "sd3", "flux", "sana"), default="pixart")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=_tiny)


def register(sub) -> None:
    """Add the diffusion subcommands to the CLI's subparsers."""
    for add in (register_train, _add_generate, _add_atoms, _add_report, _add_edit, _add_merge, _add_tiny):
        add(sub)
