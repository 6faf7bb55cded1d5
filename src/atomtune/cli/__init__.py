"""The ``atomtune`` command line: one thin parser per family of commands, each calling a workflow."""

from atomtune.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
