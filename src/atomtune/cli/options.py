"""Option parsers shared by the command families: lists of numbers and seeds, model loading, sampling."""

from __future__ import annotations

import argparse

from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED, TINY
from atomtune.errors import AtomtuneError
from atomtune.validation import (
    COUNT,
    NON_NEGATIVE,
    check_seed,
    device_option,
)


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


def add_loading(p: argparse.ArgumentParser, default: str | None = DEFAULT_PRETRAINED) -> None:
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


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=COUNT, default=20, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance-scale", type=NON_NEGATIVE, default=4.5, help="(default: %(default)s)")
    p.add_argument("--resolution", type=COUNT, default=None, help="image size (default: the model's)")


def loading_kwargs(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "variant": args.variant,
        "device": args.device,
        "local_files_only": args.local_files_only,
    }


# -- train --------------------------------------------------------------------------------------
