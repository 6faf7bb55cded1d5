"""What a long run prints while it works: progress bars, and the notices of the libraries it calls.

On a terminal a bar redraws in place. In a log (stderr a file or a pipe) every redraw would become
text of its own, so there the bar prints one plain line per tenth of the work, at most one per
``LOG_INTERVAL`` seconds, and its last state when it closes. Libraries that log the same notice on
every call (diffusers, transformers) show each distinct notice once per process.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
from typing import Any

from tqdm.auto import tqdm

#: seconds between two lines of a progress bar written to a log
LOG_INTERVAL = 30.0


class _LogBar(tqdm):
    """A tqdm bar that writes whole lines (no carriage returns), for logs."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if not text:
            return False
        self.fp.write(text + "\n")
        self.fp.flush()
        return True

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # shown with the next line

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def close(self) -> None:
        if not getattr(self, "disable", True) and self.n != getattr(self, "last_print_n", self.n):
            self.display()  # the final state, once
        self.leave = False  # nothing to clear or to end with a newline: every line is whole
        super().close()


def progress_bar(iterable: Any = None, *, total: int | None = None, disable: bool = False, **kwargs: Any):
    """``tqdm(iterable, total=..., **kwargs)`` that stays readable when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if disable or getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, total=total, disable=disable, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("mininterval", LOG_INTERVAL)
    if total:
        kwargs.setdefault("miniters", max(1, math.ceil(total / 10)))
    return _LogBar(iterable, total=total, ascii=True, **kwargs)


class _Once(logging.Filter):
    """Let each distinct warning through once; errors always pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, "_shown_once", None)  # one record passes several handlers
        if decided is None:
            key = (record.name, record.getMessage())
            decided = record.levelno >= logging.ERROR or key not in self.seen
            self.seen.add(key)
            record._shown_once = decided
        return decided


_ONCE = _Once()


def show_notices_once(libraries: tuple[str, ...] = ("diffusers", "transformers")) -> None:
    """Make each library's repeated notices (a warning per model load or per call) appear once."""
    for name in libraries:
        try:
            importlib.import_module(name)  # the library sets up its logger (and handler) on import
        except ImportError:
            continue
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):  # a child logger's records reach only the handlers
            if _ONCE not in target.filters:
                target.addFilter(_ONCE)
