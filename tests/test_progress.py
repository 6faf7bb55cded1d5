"""Progress bars and library notices stay readable in a log: whole lines, a few of them, each once."""

from __future__ import annotations

import io
import logging

from atomtune.progress import progress_bar, show_notices_once


def test_a_bar_in_a_log_prints_a_line_per_tenth_and_no_carriage_returns():
    log = io.StringIO()  # not a terminal
    bar = progress_bar(total=1000, desc="train", file=log, mininterval=0)
    for step in range(1000):
        bar.update(1)
        bar.set_postfix({"loss": f"{1 / (step + 1):.4f}"})  # every step: must not print a line each
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 10 <= len(lines) <= 12, lines
    assert lines[0].startswith("train:") and "0/1000" in lines[0]
    assert "1000/1000" in lines[-1] and "loss=0.0010" in lines[-1]


def test_a_bar_in_a_log_waits_between_lines_and_iterates():
    log = io.StringIO()
    items = list(progress_bar(range(50), desc="x", file=log))  # default: at most a line per 30 s
    assert items == list(range(50))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "0/50" in lines[0] and "50/50" in lines[1]


def test_disabled_bar_prints_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(5), file=log, disable=True):
        pass
    assert log.getvalue() == ""


def test_a_repeated_library_notice_is_shown_once():
    import diffusers  # noqa: F401  (sets up the library's logger and handler)

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root = logging.getLogger("diffusers")
    handler = Keep(level=logging.WARNING)
    root.addHandler(handler)
    try:
        show_notices_once()
        assert handler.filters, "the filter sits on the library's handlers"
        child = logging.getLogger("diffusers.models.some_module")
        for _ in range(3):
            child.warning("modules X should be kept in float32")
        child.warning("another notice")
        child.error("an error")
        child.error("an error")
        assert records == ["modules X should be kept in float32", "another notice", "an error", "an error"]
    finally:
        root.removeHandler(handler)
