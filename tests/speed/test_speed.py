"""The speed harness end to end in CI-sized form: nothing is asserted about time, only what it
measures, how it relates rows and how it fails."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from speed_helpers import cheap

from atomtune.diffusion.methods import MethodConfig
from atomtune.speed import adapt, models, runner
from atomtune.speed.cli import main


def test_speed_harness_smoke(tmp_path, capsys):
    main(cheap(tmp_path))
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == [
        "bare",
        "atoms 256",
        "atoms_padcat 256",
        "atoms_separate 256",
        "lora",
        "dora",
        "oft",
    ]
    assert rows["bare"]["trainable_params"] == 0 and rows["bare"]["train_step_ms"] > 0  # fwd + bwd
    # atoms: W_s (C x M) + D (M x C) + λ (M) per attention module, 2 modules per block, 2 blocks
    width, m = 32, 256
    assert rows["atoms 256"]["trainable_params"] == 4 * (2 * width * m + m)
    assert rows["atoms_separate 256"]["trainable_params"] == rows["atoms 256"]["trainable_params"]
    assert rows["atoms_padcat 256"]["trainable_params"] == rows["atoms 256"]["trainable_params"]
    # LoRA r=16 on q, k, v, out: (C·r + r·C) per linear
    lora = 4 * 4 * (2 * width * 16)
    assert rows["lora"]["trainable_params"] == lora == rows["atoms 256"]["lora_r16_params"]
    assert rows["atoms 256"]["params_vs_lora_r16"] == rows["atoms 256"]["trainable_params"] / lora
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]
    for r in rows.values():
        assert r["inference_ms"] > 0
        assert r["inference_vs_bare"] == r["inference_ms"] / rows["bare"]["inference_ms"]
    assert rows["atoms 256"]["inference_pruned_ms"] > 0 and rows["atoms 256"]["adapter_mb"] > 0
    table = (tmp_path / "speed.md").read_text()
    assert table.count("\n| ") == 8 and "| atoms 256 | 66,560 | 4.06x |" in table
    assert "| oft |" in capsys.readouterr().out


def test_bare_is_always_the_reference_and_atoms_run_at_several_counts(tmp_path):
    """``--methods atoms,lora`` once printed "nanx" under "vs bare": the bare row now comes first."""
    argv = cheap(tmp_path, "--methods", "atoms,lora", "--atoms", "parity,32", "--prune-to", "8")
    main([*argv, "--compile", "atoms", "--memory-resolutions", "64"])
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    parity = models.parity_atoms(models.build_transformer("cpu-tiny", "cpu", torch.float32), "cpu-tiny")
    assert list(rows) == ["bare", f"atoms {parity}", "atoms 32", "lora"]
    assert "nan" not in (tmp_path / "speed.md").read_text()
    assert rows[f"atoms {parity}"]["inference_compiled_ms"] > 0  # compiled: atoms at the first count
    assert "inference_compiled_ms" not in rows["atoms 32"] and "inference_compiled_ms" not in rows["lora"]
    memory = {(m["label"], m["resolution"]) for m in report["memory"]}
    assert memory == {("bare", 64), (f"atoms {parity}", 64), ("lora", 64)}  # atoms at the first count
    assert all(m["tokens"] == 16 for m in report["memory"])
    assert "64 px (16 tokens)" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize("preset", ["cpu-tiny", "cpu-small"])
def test_parity_is_the_atom_count_nearest_lora_r16(preset):
    model = models.build_transformer(preset, "cpu", torch.float32)
    heads = model.config.num_attention_heads
    lora = models.lora_params(model, preset)

    def atom_params(n):
        m = models.build_transformer(preset, "cpu", torch.float32)
        return adapt.apply_method(m, "atoms", n).num_trainable_parameters()

    n = models.parity_atoms(model, preset)
    assert n % heads == 0
    gap = abs(atom_params(n) - lora)
    assert gap <= abs(atom_params(n + heads) - lora) and gap <= abs(atom_params(n - heads) - lora)


def test_host_is_cast_without_diffusers_warning_and_adapters_train_in_float32(caplog):
    with caplog.at_level(logging.WARNING):
        model = models.build_transformer("cpu-tiny", "cpu", torch.bfloat16)
    assert "kept in float32" not in caplog.text
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    adapt.apply_method(model, "lora", 0)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_a_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    measure = runner.measure
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return measure(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", fail_on_third)
    with pytest.raises(RuntimeError):
        main(cheap(tmp_path, "--methods", "atoms,lora,oft", "--atoms", "8"))
    report = json.loads((tmp_path / "speed.json").read_text())
    assert [r["label"] for r in report["results"]] == ["bare", "atoms 8"]
    assert "| atoms 8 |" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize("method", ["lora", "dora", "oft"])
def test_baselines_measured_are_the_ones_trained(method):
    """The speed rows put PEFT's adapters on with the trainer's settings, not a copy of them."""
    model = models.build_transformer("cpu-tiny", "cpu", torch.float32)
    adapt.apply_method(model, method, 0)
    trained = MethodConfig(method).peft_config().to_dict()
    measured = model.peft_config["default"].to_dict()
    assert measured == trained
    assert measured["r"] == (4 if method == "oft" else 16)


def test_atom_variants_differ_only_in_the_attention_path():
    configs = {
        m: adapt.method_config(m, 8).atom_config() for m in ("atoms", "atoms_padcat", "atoms_separate")
    }
    assert configs["atoms"] == configs["atoms_padcat"] and configs["atoms"].fused
    assert configs["atoms_separate"] == dataclasses.replace(configs["atoms"], fused=False)
    assert configs["atoms"].atom_budget is None and configs["atoms"].num_atoms == 8


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "atoms,lorra"], "unknown method 'lorra'"),
        (["--atoms", "3"], "multiple of the 2 heads"),
        (["--atoms", "many"], "numbers or 'parity'"),
        (["--methods", "atoms", "--compile", "lora"], "--compile lora: not among"),
        (["--memory-resolutions", "100"], "not a multiple of 16"),
    ],
)
def test_bad_options_end_in_one_line_and_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(cheap(tmp_path, "--methods", "atoms", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
