"""Checks of what a user hands in: numbers (flags, settings fields) and tensors read from files.

Every check raises ``AtomtuneError`` with one line that names the value (an option, a settings
field, a file and the entry in it) and what is wrong with it, so a bad input is refused before
anything is loaded or written and never reaches the model as a NaN or a traceback. The command
line uses ``option(...)`` as argparse ``type=``; loaders use ``check_tensor`` on every tensor.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError

#: the largest seed torch and numpy accept
SEED_MAX = 2**32 - 1


def number_problem(
    value: Any,
    integer: bool = False,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
) -> str | None:
    """What is wrong with ``value`` as a number of this kind (``None`` if nothing)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return f"must be {kind}, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if minimum is not None and value < minimum:
        return f"must be >= {minimum}, got {value}"
    if above is not None and value <= above:
        return f"must be > {above}, got {value}"
    if maximum is not None and value > maximum:
        return f"must be <= {maximum}, got {value}"
    return None


def check_number(name: str, value: Any, **limits: Any) -> Any:
    """``value`` itself, or ``AtomtuneError`` "NAME must be ..." (limits: see ``number_problem``)."""
    problem = number_problem(value, **limits)
    if problem:
        raise AtomtuneError(f"{name} {problem}")
    return value


def check_seed(name: str, value: Any) -> int:
    return check_number(name, value, integer=True, minimum=0, maximum=SEED_MAX)


def option(kind: type = float, **limits: Any) -> Callable[[str], Any]:
    """An argparse ``type=``: the flag's text as ``kind``, checked; argparse names the flag."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        problem = number_problem(value, integer=kind is int, **limits)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse's own messages say "invalid int value"
    return parse


#: the command line's kinds of numbers
COUNT = option(int, minimum=1)
NON_NEGATIVE_INT = option(int, minimum=0)
SEED = option(int, minimum=0, maximum=SEED_MAX)
NON_NEGATIVE = option(float, minimum=0)
POSITIVE = option(float, above=0)


def check_tensor(
    tensor: torch.Tensor,
    where: str,
    shape: tuple[int, ...] | None = None,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
) -> torch.Tensor:
    """``tensor`` if its shape and dtype are the expected ones and every value is finite."""
    dtypes = tuple(dtypes)
    if tensor.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise AtomtuneError(f"{where} is {str(tensor.dtype).removeprefix('torch.')}, expected {names}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise AtomtuneError(f"{where} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AtomtuneError(f"{where} holds {bad} NaN or infinite value(s)")
    return tensor


def check_type(where: str, value: Any, kinds: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is a ``kinds`` (JSON: bool is not a number), else "WHERE must be WHAT"."""
    wrong = isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))
    if wrong or not isinstance(value, kinds):
        raise AtomtuneError(f"{where} must be {what}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_output_not_input(out: str | Path, inputs: Iterable[str | Path | None], what: str = "--out") -> None:
    """Refuse an output folder that is one of the inputs: writing it would overwrite the input."""
    target = Path(out).expanduser().resolve()
    for source in inputs:
        if source is not None and Path(source).expanduser().resolve() == target:
            raise AtomtuneError(f"{what} {out} is one of the inputs; choose another output folder")


def check_device(name: str) -> str:
    """``name`` if torch knows the device and it is present here (``cuda`` without a GPU is not)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AtomtuneError(f"unknown device {name!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise AtomtuneError(f"device {name!r} asked for, but this machine has {count} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AtomtuneError(f"device {name!r} asked for, but MPS is not available here")
    return name


def default_device() -> str:
    """Where work runs when no device is named: the GPU when torch sees one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked (``check_device``), or the default one when None."""
    return torch.device(check_device(str(device) if device is not None else default_device()))


def device_option(text: str) -> str:
    """An argparse ``type=`` for ``--device``."""
    try:
        return check_device(text)
    except AtomtuneError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
