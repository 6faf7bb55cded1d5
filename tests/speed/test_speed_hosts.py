"""The speed harness on SD3.5 and Flux: the tiny presets end to end on the CPU, the full-size presets
as shapes on the meta device (their configs, parameter counts, inputs and atoms at parity), and the
options that do not apply to these hosts."""

from __future__ import annotations

import json

import pytest
import torch
from speed_helpers import cheap

from atomtune.core.config import AtomConfig
from atomtune.core.parity import lora_parameters, parameters_per_atom, parity_atoms
from atomtune.diffusion.flux import FluxSpec
from atomtune.diffusion.sd3 import SD3Spec
from atomtune.speed import measure, models
from atomtune.speed.cli import main

SPECS = {"sd3": SD3Spec, "flux": FluxSpec}
TINY = {"cpu-tiny-sd3": "sd3", "cpu-tiny-flux": "flux"}
FULL = {"sd35-medium-1024": "sd3", "flux-dev-1024": "flux"}
# the published transformer configs (config.json of stabilityai/stable-diffusion-3.5-medium and
# black-forest-labs/FLUX.1-dev), the fields that set the model's size
PUBLISHED = {
    "sd35-medium-1024": dict(
        attention_head_dim=64,
        caption_projection_dim=1536,
        dual_attention_layers=list(range(13)),
        in_channels=16,
        joint_attention_dim=4096,
        num_attention_heads=24,
        num_layers=24,
        out_channels=16,
        patch_size=2,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        sample_size=128,
    ),
    "flux-dev-1024": dict(
        attention_head_dim=128,
        axes_dims_rope=[16, 56, 56],
        guidance_embeds=True,
        in_channels=64,
        joint_attention_dim=4096,
        num_attention_heads=24,
        num_layers=19,
        num_single_layers=38,
        patch_size=1,
        pooled_projection_dim=768,
    ),
}


def _rows(tmp_path) -> dict[str, dict]:
    return {r["label"]: r for r in json.loads((tmp_path / "speed.json").read_text())["results"]}


def test_tiny_sd3_runs_atoms_lora_at_uneven_counts_and_memory(tmp_path):
    preset = "cpu-tiny-sd3"
    argv = cheap(tmp_path, "--methods", "atoms,lora", "--atoms", "parity,5", "--prune-to", "2", preset=preset)
    main([*argv, "--memory-resolutions", "64"])
    rows = _rows(tmp_path)
    model = models.build_transformer(preset, "cpu", torch.float32)
    parity = parity_atoms(model, AtomConfig(), SD3Spec.target_modules)
    assert list(rows) == ["bare", f"atoms {parity}", "atoms 5", "lora"]  # 5 atoms over 2 heads: padded
    per_atom, multiple = parameters_per_atom(model, AtomConfig())
    assert multiple == 1
    assert rows["atoms 5"]["trainable_params"] == 5 * per_atom
    lora = lora_parameters(model, SD3Spec.target_modules)
    assert rows["lora"]["trainable_params"] == lora == rows["atoms 5"]["lora_r16_params"]
    assert rows["bare"]["trainable_params"] == 0
    for r in rows.values():
        assert r["train_step_ms"] > 0 and r["inference_ms"] > 0
    assert rows["atoms 5"]["inference_pruned_ms"] > 0 and rows["atoms 5"]["pruned_atoms_per_module"] == 2
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["settings"]["host"] == "sd3" and report["settings"]["resolution"] == 128
    assert {(m["label"], m["tokens"]) for m in report["memory"]} == {
        ("bare", 16),
        (f"atoms {parity}", 16),
        ("lora", 16),
    }
    assert "| atoms 5 | 975 |" in (tmp_path / "speed.md").read_text()


def test_tiny_flux_runs_every_method_that_applies_by_default(tmp_path):
    preset = "cpu-tiny-flux"
    main(cheap(tmp_path, "--atoms", "3", "--prune-to", "2", preset=preset))
    rows = _rows(tmp_path)
    assert list(rows) == ["bare", "atoms 3", "atoms_separate 3", "lora", "dora", "oft"]  # no padcat
    model = models.build_transformer(preset, "cpu", torch.float32)
    assert rows["lora"]["trainable_params"] == lora_parameters(model, FluxSpec.target_modules)
    assert rows["atoms 3"]["trainable_params"] == rows["atoms_separate 3"]["trainable_params"]
    assert rows["atoms 3"]["trainable_params"] == 3 * parameters_per_atom(model, AtomConfig())[0]
    assert rows["dora"]["trainable_params"] > rows["lora"]["trainable_params"]
    assert all(r["inference_ms"] > 0 and r["train_step_ms"] > 0 for r in rows.values())
    assert (tmp_path / "speed.md").read_text().count("\n| ") == 7


@pytest.mark.parametrize("preset", [*TINY, *FULL])
def test_parity_through_the_harness_is_core_parity_on_the_host_targets(preset):
    host = {**TINY, **FULL}[preset]
    meta = models.build_transformer(preset, "meta", torch.bfloat16)
    expected = parity_atoms(meta, AtomConfig(), SPECS[host].target_modules)
    assert models.resolve_atoms(("parity", "parity"), preset) == (expected,)
    assert models.parity_atoms(meta, preset) == expected
    assert models.lora_params(meta, preset) == lora_parameters(meta, SPECS[host].target_modules)


def test_flux_parity_counts_lora_on_its_feed_forward_layers_too():
    meta = models.build_transformer("flux-dev-1024", "meta", torch.bfloat16)
    attention_only = [t for t in FluxSpec.target_modules if t.startswith("attn.")]
    assert models.lora_params(meta, "flux-dev-1024") > lora_parameters(meta, attention_only)


@pytest.mark.parametrize("preset", FULL)
def test_full_size_presets_are_the_published_configs_on_meta(preset):
    model = models.build_transformer(preset, "meta", torch.bfloat16)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
    assert {k: config[k] for k in PUBLISHED[preset]} == PUBLISHED[preset]
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    low, high = {"sd35-medium-1024": (2.2, 2.3), "flux-dev-1024": (11.8, 12.0)}[preset]
    assert low < billions < high  # SD3.5-M 2.24 B, Flux.1-dev 11.90 B
    assert {p.dtype for p in model.parameters()} <= {torch.bfloat16, torch.float32}


def test_full_size_inputs_have_the_1024_px_shapes_and_a_meta_forward_keeps_them():
    sd3 = models.make_inputs("sd35-medium-1024", 1, "meta", torch.bfloat16)
    assert sd3["hidden_states"].shape == (1, 16, 128, 128)
    assert sd3["encoder_hidden_states"].shape == (1, 333, 4096)  # 77 CLIP + 256 T5 tokens
    assert sd3["pooled_projections"].shape == (1, 2048)
    flux = models.make_inputs("flux-dev-1024", 1, "meta", torch.bfloat16)
    assert flux["hidden_states"].shape == (1, 4096, 64)  # 128 x 128 latents packed 2x2
    assert flux["encoder_hidden_states"].shape == (1, 512, 4096)
    assert flux["img_ids"].shape == (4096, 3) and flux["txt_ids"].shape == (512, 3)
    assert flux["pooled_projections"].shape == (1, 768) and flux["guidance"].shape == (1,)
    for preset, inputs in (("sd35-medium-1024", sd3), ("flux-dev-1024", flux)):
        model = models.build_transformer(preset, "meta", torch.bfloat16)
        with torch.no_grad():
            assert model(**inputs).sample.shape == inputs["hidden_states"].shape


def test_flux_inputs_are_the_pipelines_packing_and_ids():
    from diffusers import FluxPipeline

    inputs = models.make_inputs("cpu-tiny-flux", 2, "cpu", torch.float32)
    side = 16 // 2
    expected = FluxPipeline._prepare_latent_image_ids(2, side, side, "cpu", torch.float32)
    assert torch.equal(inputs["img_ids"], expected)
    assert inputs["hidden_states"].shape == (2, side * side, 64)
    assert inputs["guidance"].tolist() == [FluxSpec.train_guidance] * 2


def test_a_training_step_out_of_memory_is_reported_and_inference_still_measured(tmp_path, monkeypatch):
    median_ms = measure.median_ms
    calls = []

    def oom_on_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return median_ms(*args, **kwargs)

    monkeypatch.setattr(measure, "median_ms", oom_on_first)
    main(cheap(tmp_path, "--methods", "lora", preset="cpu-tiny-sd3"))
    rows = _rows(tmp_path)
    assert rows["bare"]["out_of_memory"] and rows["bare"]["train_step_ms"] is None
    assert rows["bare"]["inference_ms"] > 0 and rows["lora"]["train_step_ms"] > 0
    assert "| bare | 0 | 0.00x | — | out of memory |" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize(
    "preset, extra, message",
    [
        ("sd3-large", [], "unknown preset 'sd3-large'"),
        ("cpu-tiny-sd3", ["--methods", "atoms_padcat"], "atoms_padcat does not apply to sd3"),
        ("cpu-tiny-flux", ["--methods", "lora", "--compile", "lora"], "--compile is measured on PixArt only"),
        ("cpu-tiny-flux", ["--atoms", "0"], "--atoms 0: must be positive"),
    ],
)
def test_options_that_do_not_apply_end_in_one_line_and_exit_2(tmp_path, capsys, preset, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(cheap(tmp_path, *extra, preset=preset))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "speed.json").exists()  # nothing measured


@pytest.mark.parametrize("preset", ["flux-dev-1024", "cpu-tiny-sd3"])
def test_plan_prints_the_counts_of_core_parity_and_measures_nothing(tmp_path, capsys, preset):
    main(cheap(tmp_path, "--plan", "--methods", "lora,atoms", "--atoms", "parity,7", preset=preset))
    out = capsys.readouterr().out
    host = {**TINY, **FULL}[preset]
    meta = models.build_transformer(preset, "meta", torch.float32)
    parity = parity_atoms(meta, AtomConfig(), SPECS[host].target_modules)
    params = parity * parameters_per_atom(meta, AtomConfig())[0]
    assert f"{sum(p.numel() for p in meta.parameters()):,} parameters\n" in out
    assert f": {lora_parameters(meta, SPECS[host].target_modules):,} parameters\n" in out
    assert f"atoms at parity: {parity} per attention module, {params:,} parameters\n" in out
    assert f"rows: bare, lora, atoms {parity}, atoms 7\n" in out
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
