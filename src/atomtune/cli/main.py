"""``atomtune`` command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from atomtune.errors import AtomtuneError
from atomtune.validation import COUNT, SEED
from atomtune.version import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends like every other bad input: one line on stderr, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _selfcheck(args: argparse.Namespace) -> None:
    from atomtune.workflows.selfcheck import run_selfcheck, summary

    result = run_selfcheck(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(summary(result))
    print(f"wrote {Path(args.out) / 'selfcheck.json'} and the adapter in {Path(args.out) / 'adapter'}")


def _inspect(args: argparse.Namespace) -> None:
    from atomtune.core.serialization import read_adapter

    meta, tensors = read_adapter(args.adapter)
    config = meta["config"]
    print(
        f"adapter {meta['adapter_name']!r} for {meta['base_model']['class']} "
        f"({meta['base_model']['name_or_path'] or 'no name recorded'}), atomtune {meta['atomtune_version']}"
    )
    where = (
        f"placement={config.placement} attention={config.attention}"
        if config.mode == "attention"
        else f"target_modules={config.target_modules}"
    )
    print(f"mode={config.mode} shrinkage={config.shrinkage} {where}")
    kept = 0
    for name, shape in meta["modules"].items():
        active = int((tensors[f"{name}.mask"] != 0).sum())
        kept += active
        print(
            f"  {name}: {shape['num_atoms']} atoms ({active} unmasked), "
            f"{shape['in_features']} -> {shape['out_features']}"
            + (f", heads={shape['heads']}" if config.mode == "attention" else "")
        )
    print(
        f"{len(meta['modules'])} modules, {kept} unmasked atoms "
        f"({kept / max(len(meta['modules']), 1):.1f} per module of a {config.num_atoms}-atom dictionary"
        f"{f', budget {config.atom_budget}' if config.atom_budget else ''}), "
        f"{sum(t.numel() for t in tensors.values())} stored values"
    )
    record = Path(args.adapter).expanduser() / "training.json"
    sparsity = _json_field(record, "sparsity")
    if isinstance(sparsity, dict) and {"zero_share", "active_per_token"} <= set(sparsity):
        print(
            f"training (last tenth): {sparsity['zero_share']:.1%} of the coefficients zero, "
            f"{sparsity['active_per_token']:.1f} atoms active per token"
        )


def _json_field(path: Path, key: str):
    """``key`` of a JSON object file, or None when the file is absent or not such an object."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="atomtune", description="Sparse fine-tuning of transformers with feature-dictionary atoms."
    )
    parser.add_argument("--version", action="version", version=f"atomtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("selfcheck", help="fine-tune a tiny PixArt transformer with atoms and report")
    p.add_argument("--out", default="atomtune-selfcheck", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=COUNT, default=400)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_selfcheck)

    from atomtune.cli.experiments import register as register_experiments

    register_experiments(sub)  # experiment fourier | vae

    p = sub.add_parser("inspect", help="print an adapter folder's config and per-module atoms")
    p.add_argument("adapter", help="folder with adapter_config.json and adapter_model.safetensors")
    p.set_defaults(func=_inspect)

    from atomtune.cli.diffusion import register as register_diffusion

    register_diffusion(sub)  # train, generate, atoms, edit, merge, tiny-pipeline
    from atomtune.cli.evaluation import add_eval_subcommands

    add_eval_subcommands(sub)  # eval, benchmark-dreambooth
    from atomtune.cli.testbed import register as register_testbed

    register_testbed(sub)  # demo; testbed pretrain | judges | bench | preview
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except AtomtuneError as exc:
        print(f"atomtune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder that is a file, a full disk, no permission: one line
        print(f"atomtune: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
