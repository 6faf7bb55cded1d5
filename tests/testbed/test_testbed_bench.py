"""The shipped checkpoint draws digits; the mini-DreamBooth bench and the demo run end to end on a
reduced grid and write tables whose numbers are in range; resume and bad input behave."""

from __future__ import annotations

import json

import pytest
import torch

from atomtune.cli import main
from atomtune.cli.main import build_parser
from atomtune.cli.testbed import bench_settings
from atomtune.diffusion.methods import DEFAULT_ATOM_BUDGET, DEFAULT_FORM, DEFAULT_NUM_ATOMS
from atomtune.errors import AtomtuneError
from atomtune.testbed import customize as cz
from atomtune.testbed.bench import BenchSettings, run_bench
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.digits import COLORS, Attributes
from atomtune.testbed.judges import extract_glyph, load_classifier
from atomtune.testbed.model import read_metadata, shipped_weights


@pytest.fixture(scope="module")
def pipe():
    return digit_pipeline()


def test_shipped_checkpoint_draws_the_digits_it_was_taught(pipe):
    path, config, schedule = read_metadata()
    assert path == shipped_weights() and path.stat().st_size < 20 * 2**20
    assert config["num_attention_heads"] == pipe.transformer.config.num_attention_heads
    assert schedule["prediction_type"] == pipe.scheduler.config.prediction_type == "v_prediction"
    attrs = [Attributes(d, "white", "large", "in the center") for d in range(9)]
    images = pipe([a.caption() for a in attrs], list(range(9)), steps=20, guidance_scale=cz.GUIDANCE)
    with torch.no_grad():
        predicted = load_classifier()(extract_glyph(images)).argmax(1)
    # the judge reads back most digits (a random or broken checkpoint scores about 0.1)
    assert (predicted == torch.arange(9)).float().mean() >= 0.7


def test_prompt_parsing_and_prompt_files(tmp_path):
    a = cz.parse_prompt("a small red sks digit in the top left corner")
    assert (a.color, a.size, a.place) == ("red", "small", "in the top left corner")
    assert cz.parse_prompt("a large blue sks digit").place == "in the center"
    assert cz.parse_prompt("a sks digit on a beach") is None
    f = tmp_path / "p.txt"
    f.write_text("# mine\na large green {}\n\na sks digit on the moon\n")
    prompts = cz.read_digit_prompts(f)
    assert [p.text for p in prompts] == ["a large green sks digit", "a sks digit on the moon"]
    assert prompts[0].attributes.color == "green" and prompts[1].attributes is None
    f.write_text("a large green seven\n")
    with pytest.raises(AtomtuneError, match="without the concept"):
        cz.read_digit_prompts(f)
    with pytest.raises(AtomtuneError, match="not found"):
        cz.read_digit_prompts(tmp_path / "missing.txt")


def test_style_share_reads_stroke_color():
    red = (cz.instance_images(9, 2) + 1) / 2 * 0  # black canvases
    red[:, 0, 8:16, 8:16] = 1.0
    magenta = (cz.style_images(9, 2) + 1) / 2
    assert cz.style_share(red) == 0.0 and cz.style_share(magenta) == 1.0
    assert cz.STYLE_RGB not in COLORS.values()  # the style is a color no caption names


def test_bench_on_a_reduced_grid_writes_tables_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red {}\na small blue {} in the top right corner\n")
    settings = BenchSettings(
        methods=("atoms", "lora"), seeds=(0,), learning_rates=(1e-3,), steps=4, num_atoms=12,
        atom_budget=2, eval_seeds=(0,), prompts=str(prompts),
    )  # fmt: skip
    out = tmp_path / "bench"
    report = run_bench(settings, out, progress=False)
    table = (out / "bench.md").read_text()
    for row in ("| pretrained |", "| atoms |", "| lora |", "| atoms-random |", "| atoms-dense |"):
        assert row in table
    for row in ("| merge: sum |", "| merge: concat |", "| recipe, top 1 |", "| random cuts to 2 |"):
        assert row in table
    assert json.loads((out / "bench.json").read_text())["chosen_learning_rate"] == {
        "atoms": 1e-3,
        "lora": 1e-3,
        "atoms-random": 1e-3,
        "atoms-dense": 1e-3,
    }
    for method, rows in report["results"].items():
        for r in rows:
            for key in ("p_target", "alignment", "prior"):
                assert 0.0 <= r[key] <= 1.0, (method, key)
            assert r["trainable_params"] > 0 and r["adapter_mb"] > 0
    assert [r["k"] for r in report["topk"]["rows"]] == [1, 1, 2, 2, 2, 12]
    assert report["topk"]["sparsity"]["live_atoms"]["mean"] <= 2  # the recipe keeps its budget
    assert report["topk"]["no_cut_sparsity"]["live_atoms"]["mean"] == 12
    assert 0 <= report["merge"]["shared_atom_ids"] <= 1
    merge = report["merge"]["rows"]
    assert "| lora: direct sum |" in table and (out / "merge" / "style-lora" / "adapter").is_dir()
    for name, alone in (("merge: sum", "concept only"), ("lora: direct sum", "lora: concept only")):
        if merge[alone]["p_target"] > 0:  # each merge is judged against its own method's concept
            assert merge[name]["concept_kept"] == pytest.approx(
                merge[name]["p_target"] / merge[alone]["p_target"]
            )
    halves = report["topk"]["halves"]
    top1 = report["topk"]["rows"][0]["p_target"]["mean"]
    assert halves["k"] == 1 and halves["top_gain"] == pytest.approx(top1 - report["base"]["p_target"])
    assert "Top half (1 live atoms per module) against a random half" in table
    across = halves["across_modules"]  # half of all live atoms, ranked over the modules together
    from safetensors.torch import load_file

    shipped = out / "runs" / "atoms" / "lr-0.001" / "seed-0" / "adapter" / "adapter_model.safetensors"
    masks = [t for name, t in load_file(shipped).items() if name.endswith(".mask")]
    assert masks and across["atoms"] == sum(int((m != 0).sum()) for m in masks) // 2
    assert "Ranked over all modules together" in table
    assert (out / "frontier.png").is_file() and (out / "runs" / "atoms").is_dir()
    lines = (out / "instance_images" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == cz.instance_captions(9, settings.instances)
    record = json.loads(
        (out / "runs" / "atoms" / "lr-0.001" / "seed-0" / "adapter" / "training.json").read_text()
    )
    assert record["instance_captions"] is True
    # a rerun reads the finished runs instead of training again
    marker = out / "runs" / "lora" / "lr-0.001" / "seed-0" / "result.json"
    stamp = marker.stat().st_mtime_ns
    run_bench(settings, out, progress=False)
    assert marker.stat().st_mtime_ns == stamp
    # ... but not with other settings
    with pytest.raises(AtomtuneError, match="other settings"):
        run_bench(BenchSettings(methods=("atoms",), seeds=(0,), steps=3), out, progress=False)


def test_one_selection_rule_keeps_the_other_digits_and_alignment():
    """The kept rate draws the concept best among the rates that keep prior ≥ 0.9 and alignment ≥ 0.95;
    when none does, the best mean of the three."""
    from atomtune.testbed.bench import _choose

    rows = [
        {"learning_rate": 1e-4, "p_target": 0.5, "alignment": 1.0, "prior": 1.0},
        {"learning_rate": 3e-4, "p_target": 0.8, "alignment": 0.96, "prior": 0.92},
        {"learning_rate": 1e-3, "p_target": 0.95, "alignment": 1.0, "prior": 0.85},  # forgets other digits
        {"learning_rate": 3e-3, "p_target": 0.99, "alignment": 0.9, "prior": 1.0},  # loses alignment
    ]
    assert _choose(rows)["learning_rate"] == 3e-4
    assert _choose(rows[2:])["learning_rate"] == 3e-3  # (0.99 + 0.9 + 1.0) / 3 beats (0.95 + 1.0 + 0.85) / 3


def test_bench_cli_runs_the_recipe_unless_told_otherwise():
    parser = build_parser()
    recipe = bench_settings(parser.parse_args(["testbed", "bench", "--out", "x"]))
    assert (recipe.num_atoms, recipe.atom_budget) == (DEFAULT_NUM_ATOMS[DEFAULT_FORM], DEFAULT_ATOM_BUDGET)
    told = bench_settings(
        parser.parse_args(["testbed", "bench", "--out", "x", "--num-atoms", "8", "--atom-budget", "2"])
    )
    assert (told.num_atoms, told.atom_budget) == (8, 2)


def test_bench_cli_rejects_bad_options(tmp_path, capsys):
    assert main(["testbed", "bench", "--out", str(tmp_path), "--methods", "atoms,ia3"]) == 2
    assert "unknown method(s) ia3" in capsys.readouterr().err
    assert main(["testbed", "bench", "--out", str(tmp_path), "--seeds", "0,x"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
    assert main(["testbed", "bench", "--out", str(tmp_path), "--prompts", str(tmp_path / "no.txt")]) == 2
    assert "prompts file not found" in capsys.readouterr().err


def test_demo_writes_its_folder(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for name in ("images.png", "heatmap.png", "sweep.png", "summary.md", "rankings.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_model.safetensors").is_file()
    for key in ("p_target", "alignment", "prior"):
        assert 0 <= summary["before"][key] <= 1 and 0 <= summary["after"][key] <= 1
    assert summary["before"]["prior"] >= 0.8  # the shipped model draws the other digits
    assert "atomtune demo" in capsys.readouterr().out
    page = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert page["ks"] == summary["sweep_ks"] and page["maps"]  # the digits' tokens are mapped
    words = (tmp_path / "demo" / "summary.md").read_text()
    assert "report/report.html" in words and f"atom {page['shown'][0]['id']} of" in words


def test_demo_bad_input_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "steps and num_atoms must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything is written
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert main(["demo", "--out", str(blocker), "--quiet"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("atomtune: error: Not a directory")
    assert str(blocker) in errors[0]
    assert blocker.read_text() == "keep me"


def test_prior_images_are_the_models_own_drawings_under_their_captions(pipe, tmp_path):
    folder = cz.prior_images(pipe, holdout=9, folder=tmp_path / "prior", per_digit=1)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 9 and all((folder / r["file_name"]).is_file() for r in records)
    digits = [next(d for d, w in enumerate(cz.WORDS) if f" {w} " in f" {r['text']} ") for r in records]
    assert sorted(digits) == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # every digit but the held-out one
    instance = cz.write_images(cz.instance_images(9, 2), tmp_path / "instance")
    result = cz.train_adapter(
        pipe, "atoms", instance, cz.INSTANCE_PROMPT, tmp_path / "run", 1e-3, 2, 0, 12, class_dir=folder
    )
    result.tuned.unload()
    assert all("prior" in h for h in result.history) and len(result.class_images) == 9
