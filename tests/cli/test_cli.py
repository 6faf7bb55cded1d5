"""The command line: the self-check runs; bad input ends in one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from atomtune.cli import main


def test_selfcheck_and_inspect(tmp_path, capsys):
    assert main(["selfcheck", "--steps", "3", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "atoms carry 90% of each module's change" in out
    result = json.loads((tmp_path / "selfcheck.json").read_text())
    assert result["reload_max_abs_diff"] == 0.0
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "PixArtTransformer2DModel" in out and "transformer_blocks.3.attn2" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "/nonexistent/adapter"], "adapter folder not found"),
        (["inspect", "."], "adapter_config.json is missing"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["selfcheck", "--no-such-option"])
    assert exc.value.code == 2


def test_fourier_experiment_rejects_bad_settings(capsys):
    assert main(["experiment", "fourier", "--steps", "0", "--out", "unused"]) == 2
    assert "steps >= 1" in capsys.readouterr().err
