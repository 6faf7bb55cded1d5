"""The speed benchmark's flags (``python -m atomtune.speed``): parsed, checked, handed to ``run``.

Bad options end in one line and exit code 2, before anything is measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from atomtune.errors import AtomtuneError
from atomtune.speed.report import markdown
from atomtune.speed.runner import plan, run
from atomtune.speed.settings import HOST_METHODS, METHODS, PRESETS, host_of


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="atoms vs PEFT baselines: speed and memory")
    p.add_argument("--preset", default="cpu-tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--methods",
        help=f"from {','.join(METHODS)} (default: all that apply to the preset's host); "
        "the bare model is always measured",
    )
    p.add_argument(
        "--atoms",
        default="256",
        help="atoms per module, one row each: numbers or 'parity' (LoRA r=16's parameters)",
    )
    p.add_argument("--num-atoms", dest="atoms", help=argparse.SUPPRESS)  # the former name
    p.add_argument("--prune-to", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--compile",
        nargs="?",
        const="all",
        default="",
        help="also time inference through regional torch.compile for these methods (default: all measured)",
    )
    p.add_argument(
        "--memory-resolutions",
        default="",
        help="pixels, e.g. 512,2048: peak training memory of bare, LoRA, atoms",
    )
    p.add_argument("--out", type=Path, help="folder for speed.json and speed.md (rewritten as it goes)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="first write --out/profile-atoms-N.txt: the operators of atoms' step",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the preset's parameter counts, atoms at parity and the rows a run would measure; "
        "measure nothing",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    try:
        methods = None if args.methods is None else _list(args.methods)
        measured = HOST_METHODS[host_of(args.preset)] if methods is None else methods
        compiled = ("bare", *measured) if args.compile == "all" else _list(args.compile)
        try:
            resolutions = tuple(int(r) for r in _list(args.memory_resolutions))
        except ValueError:
            raise AtomtuneError(
                f"--memory-resolutions takes pixels, got {args.memory_resolutions!r}"
            ) from None
        if args.plan:
            print(plan(args.preset, methods, _list(args.atoms)))
            return
        report = run(
            args.preset,
            args.batch,
            args.device,
            args.dtype,
            methods,
            _list(args.atoms),
            args.warmup,
            args.repeats,
            args.prune_to,
            tuple(dict.fromkeys(compiled)),
            resolutions,
            args.out,
            args.profile,
        )
    except AtomtuneError as exc:
        cli.exit(2, f"atomtune.speed: error: {exc}\n")
    print(markdown(report))
