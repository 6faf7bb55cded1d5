"""The ``atomtune experiment`` commands: the paper's toy (``fourier``) and VAE (``vae``) from the shell.

Registered into the main parser like the other areas' commands, so the experiments' flags live next
to the experiments; their modules are imported only when a command runs, keeping ``--help`` fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atomtune.errors import AtomtuneError
from atomtune.validation import SEED_MAX


def _fourier(args: argparse.Namespace) -> None:
    from atomtune.experiments.fourier import FourierSettings, run_fourier

    if not 0 <= args.seed <= SEED_MAX or (args.steps is not None and args.steps < 1):
        raise AtomtuneError(f"seed must be in 0..{SEED_MAX} and steps >= 1")
    base = FourierSettings.fast if args.fast else FourierSettings.for_layout
    settings = base(args.seed, args.layout)
    if args.steps is not None:
        settings = settings.replace(steps=args.steps)
    r = run_fourier(settings, Path(args.out), progress=not args.quiet, processes=args.processes)
    dense, sparse = r["dense"], r["sparse"]
    print(
        f"layout {settings.layout}; masked error (NMSE): dense {dense['masked_nmse']:.3f}, "
        f"sparse {sparse['masked_nmse']:.3f}, linear map {r['linear_nmse']:.3f}; "
        f"atoms needed: dense {dense['atoms_needed_mean']:.1f}, sparse {sparse['atoms_needed_mean']:.1f}; "
        f"Fourier-like sparse atoms: {sparse['fourier_like_atoms']}; {r['seconds']:.0f}s"
    )
    print(f"wrote {Path(args.out) / 'fourier.json'} and {Path(args.out) / 'fourier.png'}")


def _vae(args: argparse.Namespace) -> None:
    from atomtune.experiments.vae import VaeSettings, run_vae

    source, *rest = args.data
    if (source == "digits" and rest) or (source == "mnist-idx" and len(rest) != 1):
        raise AtomtuneError("--data takes 'digits' or 'mnist-idx DIR'")
    if args.seed < 0:
        raise AtomtuneError("seed must be >= 0")
    settings = VaeSettings.fast(args.seed) if args.fast else VaeSettings(seed=args.seed)
    settings = settings.replace(
        data=source, mnist_dir=rest[0] if rest else None, old_digit=args.old_digit, new_digit=args.new_digit
    )
    if source == "mnist-idx" and args.images_per_class is None:
        settings = settings.replace(images_per_class=1000)  # keeps MNIST's run in minutes
    if args.images_per_class is not None:
        settings = settings.replace(images_per_class=args.images_per_class)
    if args.form is not None:
        settings = settings.replace(form=args.form)
    if args.num_atoms is not None:
        settings = settings.replace(num_atoms=args.num_atoms)
    for name in ("atom_budget", "budget_lora_rank"):
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                raise AtomtuneError(f"--{name.replace('_', '-')} must be >= 0 (0 skips that fine-tune)")
            settings = settings.replace(**{name: value or None})
    settings.validate()
    r = run_vae(settings, Path(args.out), progress=not args.quiet)
    new = settings.new_digit
    print(
        f"P({new}) of generated digits: pretrained {r['pretrained']['p_new']:.3f}, "
        f"atoms {r['atoms']['p_new']:.3f}, LoRA {r['lora']['p_new']:.3f}"
        + (
            f", atoms cut to {settings.atom_budget} {r['atoms_budget']['p_new']:.3f}"
            if "atoms_budget" in r
            else ""
        )
        + "; "
        f"zero coefficients {r['atoms']['zero_coefficient_share']:.3f}; {r['seconds']['total']:.0f}s"
    )
    print(
        f"wrote {Path(args.out) / 'vae.json'}, {Path(args.out) / 'vae.md'} and {Path(args.out) / 'vae.png'}"
    )


def register(sub) -> None:
    """Add ``experiment fourier`` and ``experiment vae`` to the main parser's subcommands ``sub``."""
    p = sub.add_parser("experiment", help="the paper's small experiments")
    ex = p.add_subparsers(dest="experiment", required=True)
    p = ex.add_parser("fourier", help="toy: masked Fourier signals, sparse atoms against a dense block")
    p.add_argument("--out", default="atomtune-fourier", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps of each block")
    p.add_argument(
        "--layout",
        choices=("positions", "lifted"),
        default="positions",
        help="tokens are the samples (the paper's), or the lifted dims (the earlier layout, where "
        "neither block beats a linear map) (default: %(default)s)",
    )
    p.add_argument(
        "--processes",
        type=int,
        choices=(1, 2),
        default=2,
        help="train the two blocks one after the other (1) or side by side in two processes "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--fast", action="store_true", help="the test suite's setting: fewer steps, under a minute"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_fourier)
    p = ex.add_parser("vae", help="transformer VAE: a model of one digit taught another, atoms against LoRA")
    p.add_argument("--out", default="atomtune-vae", help="output folder (default: %(default)s)")
    p.add_argument(
        "--data",
        nargs="+",
        default=["digits"],
        metavar="SOURCE",
        help="'digits' (scikit-learn's, bundled; default) or 'mnist-idx DIR' (MNIST IDX files in DIR)",
    )
    p.add_argument("--old-digit", type=int, default=8, help="the digit pretrained on (default: %(default)s)")
    p.add_argument("--new-digit", type=int, default=3, help="the digit fine-tuned to (default: %(default)s)")
    p.add_argument("--images-per-class", type=int, default=None, help="cap per class (mnist-idx: 1000)")
    p.add_argument(
        "--form",
        choices=("projections", "attention"),
        default=None,
        help="atoms on the four projections LoRA adapts (default) or the paper's attention update",
    )
    p.add_argument(
        "--num-atoms", type=int, default=None, help="atoms per adapted module (default: 8 per projection)"
    )
    p.add_argument(
        "--atom-budget",
        type=int,
        default=None,
        help="atoms kept per module by the dense-then-prune fine-tune (default: 2; 0 skips it)",
    )
    p.add_argument(
        "--budget-lora-rank",
        type=int,
        default=None,
        help="rank of the LoRA compared with the pruned atoms (default: 2; 0 skips it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="the test suite's setting: seconds, not minutes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_vae)
