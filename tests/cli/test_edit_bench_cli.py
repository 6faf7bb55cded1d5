"""``atomtune testbed edit-bench`` on bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import pytest

from atomtune.cli import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "atoms,ia3"], "unknown method(s) ia3"),
        (["--digits", "9,x"], "--digits must be comma-separated integers"),
        (["--digits", "9,12"], "digits must be in 0..9"),
        (["--seeds", "0,100"], "selection seed 100 must not be a report seed"),
        (["--learning-rates", "1e-4,abc"], "not a comma-separated list of float"),
        (["--num-atoms", "4", "--atom-budget", "6"], "atom budget must be in 1..4"),
    ],
)
def test_edit_bench_bad_input_is_one_line_and_exit_2(flags, message, tmp_path, capsys):
    out = tmp_path / "edit"
    assert main(["testbed", "edit-bench", "--out", str(out), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # refused before anything is written
