"""The five commands end to end on the tiny pipeline, through the CLI as a user runs them:
train → generate → atoms (+ sweep) → edit → merge, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from atomtune.cli import main
from atomtune.diffusion.methods import MethodConfig, apply_method
from atomtune.diffusion.pipeline import tiny_pixart_pipeline
from atomtune.tiny import tiny_pixart
from atomtune.workflows.generate import GenerateSettings, generate
from diffusion_helpers import dreambooth_images, one_thread

PROJECTIONS = ("to_k", "to_out.0", "to_q", "to_v")  # sorted: atoms live on each projection LoRA adapts
MODULES = [f"transformer_blocks.{b}.{a}.{p}" for b in (0, 1) for a in ("attn1", "attn2") for p in PROJECTIONS]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A concept adapter (dog, from a settings file + flags) and a style adapter, trained via the CLI."""
    root = tmp_path_factory.mktemp("runs")
    dog = dreambooth_images(root / "data" / "dog", "dog", 4)
    cartoon = dreambooth_images(root / "data" / "red_cartoon", "red_cartoon", 3)
    settings = root / "settings.yaml"
    settings.write_text(
        "pretrained: tiny\nmethod: atoms\nnum_atoms: 8\natom_budget: 0\nlearning_rate: 0.01\nmax_steps: 3\n"
    )
    with one_thread():
        for data, prompt, out in ((dog, "a sks dog", "dog"), (cartoon, "a sks cartoon", "style")):
            argv = ["train", "--config", str(settings), "--instance-data", str(data), "--quiet"]
            assert main([*argv, "--instance-prompt", prompt, "--output-dir", str(root / out)]) == 0
    return root


def _diff(a, b) -> int:
    """Largest difference of two uint8 images. Equal computations by different code paths (atoms
    masked or silenced vs no adapter) may differ in the last float bits on some CPUs: they must agree
    to within 3 levels; a real change moves pixels by tens of levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_train_wrote_what_the_settings_asked_for(runs):
    record = json.loads((runs / "dog" / "adapter" / "training.json").read_text())
    assert record["settings"]["num_atoms"] == 8 and record["steps"] == 3 and record["base_model"] == "tiny"
    assert len(json.loads((runs / "dog" / "history.json").read_text())) == 3


def test_generate_writes_images_grid_and_metadata(runs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks dog in the snow\n# skipped\na sks dog on the beach\n")
    argv = [
        "generate",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        "--adapter",
        str(runs / "dog" / "adapter"),
        "--quiet",
    ]
    argv += ["--prompts-file", str(prompts), "--num-images", "2", "--seed", "5", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "gen")]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    meta = json.loads((tmp_path / "gen" / "images.json").read_text())
    assert meta["seeds"] == [5, 6] and meta["prompts"][1] == "a sks dog on the beach"
    images = [_png(tmp_path / "gen" / name) for name in meta["images"]]
    assert len(images) == 4 and all(img.shape == (32, 32, 3) for img in images)
    assert _diff(images[0], images[1]) > 10  # two seeds, two images
    grid = _png(tmp_path / "gen" / "grid.png")
    assert grid.shape[0] > 2 * 32 and grid.shape[1] > 2 * 32


def test_masks_and_gains_steer_the_generated_image(runs, tmp_path):
    pipe = tiny_pixart_pipeline()
    adapter = runs / "dog" / "adapter"

    def image(name, **kwargs):
        result = generate(
            GenerateSettings(["a sks dog"], tmp_path / name, steps=2, **kwargs), pipe, progress=False
        )
        return _png(result.images[0])

    base = image("base")
    full = image("full", adapters=[adapter])
    assert _diff(base, full) > 10  # the trained adapter changes the image
    assert _diff(image("none", adapters=[adapter], top_k=0), base) <= 3  # no atom: the base model
    assert np.array_equal(image("all", adapters=[adapter], top_k=8), full)  # every atom: the adapter
    gained = image("gain", adapters=[adapter], gains=[f"{m}:{a}=0" for m in MODULES for a in range(8)])
    assert _diff(gained, base) <= 3  # zero gain on every atom silences the adapter
    assert np.array_equal(image("after"), base)  # the pipeline came back without adapters


def test_atoms_rankings_heatmap_and_sweep(runs, tmp_path, capsys):
    out = tmp_path / "atoms"
    argv = [
        "atoms",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        "--adapter",
        str(runs / "dog" / "adapter"),
        "--steps",
        "2",
    ]
    assert main([*argv, "--seeds", "0,1", "--sweep", "--quiet", "--out", str(out)]) == 0
    assert "k = 1, 2, 4, 8" in capsys.readouterr().out
    rankings = json.loads((out / "rankings.json").read_text())
    assert rankings["prompts"] == ["a sks dog"]  # the adapter's instance prompt, by default
    assert len(rankings["timesteps"]) == 2 and rankings["seeds"] == [0, 1]
    assert sorted(rankings["modules"]) == MODULES
    for entry in rankings["modules"].values():
        assert sorted(entry["atom_ids"]) == list(range(8))
        assert entry["contribution"] == sorted(entry["contribution"], reverse=True)
        assert entry["tokens"] > 0
    assert _png(out / "heatmap.png").shape[0] > 100
    strip = [_png(out / "sweep" / f"k-{k:04d}.png") for k in (1, 2, 4, 8)]
    settings = GenerateSettings(
        ["a sks dog"], tmp_path / "full", adapters=[runs / "dog" / "adapter"], steps=2
    )
    full = generate(settings, tiny_pixart_pipeline(), progress=False)
    assert np.array_equal(strip[-1], _png(full.images[0]))  # all M atoms = the adapter as trained
    assert _diff(strip[0], strip[-1]) > 10
    assert _png(out / "sweep.png").shape[1] >= 4 * 32


def test_edit_trains_on_one_image_and_writes_the_tradeoff_grid(runs, tmp_path, capsys):
    image = sorted((runs / "data" / "dog").iterdir())[0]
    out = tmp_path / "edit"
    argv = [
        "edit",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        "--image",
        str(image),
        "--source-prompt",
        "a photo of a dog",
    ]
    argv += ["--target-prompt", "a photo of a dog wearing a hat", "--epochs", "3", "--num-atoms", "8"]
    assert main([*argv, "--ks", "4,1", "--steps", "2", "--lr", "0.01", "--quiet", "--out", str(out)]) == 0
    assert "edit_grid.png" in capsys.readouterr().out
    meta = json.loads((out / "edit.json").read_text())
    assert meta["columns"] == ["all 8", "k=4", "k=1", "base"]
    assert json.loads((out / "train" / "adapter" / "training.json").read_text())["steps"] == 3
    base = generate(
        GenerateSettings(["a photo of a dog wearing a hat"], tmp_path / "b", steps=2),
        tiny_pixart_pipeline(),
        progress=False,
    )
    assert _diff(_png(out / "images" / "target01-base.png"), _png(base.images[0])) <= 3
    assert _diff(_png(out / "images" / "target01-all8.png"), _png(base.images[0])) > 10
    grid = _png(out / "edit_grid.png")
    assert grid.shape[1] > 4 * 32 and grid.shape[0] > 2 * 32
    assert (out / "rankings.json").is_file() and (out / "heatmap.png").is_file()


@pytest.mark.parametrize("how", ["sum", "concat"])
def test_merge_reports_overlap_per_layer(runs, tmp_path, capsys, how):
    concept, style = runs / "dog" / "adapter", runs / "style" / "adapter"
    out = tmp_path / "merged"
    argv = [
        "merge",
        "--pretrained",
        "tiny",
        "--device",
        "cpu",
        str(concept),
        str(style),
        "--how",
        how,
        "--top-k",
        "3",
    ]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(m in printed for m in MODULES) and "mean" in printed
    report = json.loads((out / "overlap.json").read_text())
    assert sorted(report["modules"]) == MODULES and report["k"] == 3
    for row in report["modules"].values():
        assert row["overlap"] == len(row["shared"]) / 3 and 0 <= row["jaccard"] <= row["overlap"]
    merged, a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (out, concept, style))
    key = "transformer_blocks.0.attn1.to_v.W_s"
    if how == "sum":
        assert torch.allclose(merged[key], a[key] + b[key])  # the paper: parameters added
    else:
        assert merged[key].shape[1] == 16  # both dictionaries, stacked
        pipe = tiny_pixart_pipeline()
        one = generate(
            GenerateSettings(["a sks dog"], tmp_path / "one", adapters=[out], steps=2), pipe, progress=False
        )
        both = generate(
            GenerateSettings(["a sks dog"], tmp_path / "two", adapters=[concept, style], steps=2),
            pipe,
            progress=False,
        )
        assert np.array_equal(_png(one.images[0]), _png(both.images[0]))


@pytest.fixture(scope="module")
def foreign_lora(tmp_path_factory):
    """A LoRA adapter made for a wider PixArt transformer than the tiny pipeline's."""
    path = tmp_path_factory.mktemp("foreign") / "lora"
    apply_method(tiny_pixart(head_dim=16), MethodConfig("lora"), "other-model").save(path)
    return path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--method", "lokr"], "unknown method 'lokr'; choose one of atoms, lora, dora, oft"),
        (["train", "--instance-prompt", "a dog"], "does not contain the unique token 'sks'"),
        (["train", "--instance-data", "{empty}"], "no images in"),
        (["train", "--instance-data", "{text}"], "none an image"),
        (["generate", "--adapter", "{foreign}", "--prompt", "a sks dog"], "is for another model"),
        (["generate", "--pretrained", "./no/such/folder", "--prompt", "x"], "pipeline folder not found"),
        (["generate", "--adapter", "{concept}", "--prompt", "x", "--gain", "bad"], "is not MODULE:ATOM=GAIN"),
        (["atoms", "--adapter", "{foreign}"], "atom analysis needs an atoms adapter"),
        (["merge", "{concept}", "{foreign}"], "merge takes atoms adapters"),
        (
            ["merge", "{concept}", "{style}", "--concept-only", "attn9.to_q"],
            "no adapted module has 'attn9.to_q' in its name",
        ),
        (
            ["generate", "--adapter", "{concept}", "--prompt", "x", "--first-only", "to_q"],
            "two or more adapters",
        ),
        (["edit", "--image", "{empty}", "--source-prompt", "a dog", "--target-prompt", "x"], "no images in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, runs, foreign_lora, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("x")
    names = {
        "{empty}": tmp_path / "empty",
        "{text}": tmp_path / "text",
        "{foreign}": foreign_lora,
        "{concept}": runs / "dog" / "adapter",
        "{style}": runs / "style" / "adapter",
    }
    argv = [str(names.get(a, a)) for a in argv]
    defaults = {
        "train": [
            "--pretrained",
            "tiny",
            "--instance-data",
            str(runs / "data" / "dog"),
            "--instance-prompt",
            "a sks dog",
            "--output-dir",
            str(tmp_path / "o"),
        ],
        "generate": ["--pretrained", "tiny", "--out", str(tmp_path / "o")],
        "atoms": ["--pretrained", "tiny", "--out", str(tmp_path / "o")],
        "merge": ["--pretrained", "tiny", "--out", str(tmp_path / "o")],
        "edit": ["--pretrained", "tiny", "--out", str(tmp_path / "o")],
    }[argv[0]]
    assert main([argv[0], *defaults, *argv[1:]]) == 2  # the case's own flags come last and win
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _readme_commands() -> list[list[str]]:
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Diffusion workflows", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```console\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line[2:]) for line in block.splitlines() if line.startswith("$ atomtune ")]


def test_readme_diffusion_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """README's commands, verbatim (the DreamBooth folder resolved), from a scratch folder."""
    commands = _readme_commands()
    assert {c[1] for c in commands} == {"train", "generate", "atoms", "edit", "merge", "report"}
    data = dreambooth_images(tmp_path / "data" / "dog", "dog", 5).parent
    dreambooth_images(data / "red_cartoon", "red_cartoon", 3)
    dreambooth_images(data / "cat", "cat", 1)
    (data / "cat" / "00.png").rename(data / "cat" / "00.jpg")  # README names the original file
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = [a.replace("$DATA", str(data)) for a in argv[1:]]
        assert main([*argv, "--quiet"]) == 0, argv
    out = capsys.readouterr().out
    assert "trained atoms for 15 steps" in out  # 10, then resumed to 3 epochs of 5 images
    written = ["runs/dog/adapter/README.md", "out/generate/grid.png", "out/atoms/sweep.png"]
    written += ["out/atoms/heatmap.png", "out/edit/edit_grid.png", "out/merged/overlap.json"]
    written += ["out/report/report.html"]  # of the merge: each atom says which input it came from
    for path in written:
        assert (tmp_path / path).is_file(), path


def test_a_budget_run_reports_its_true_sparsity_everywhere(tmp_path, capsys):
    """Default training cuts the dictionary to its budget; the saved adapter, the training record,
    ``inspect`` and ``atoms`` all report the atoms that are left and how sparse they act."""
    data = dreambooth_images(tmp_path / "dog", "dog", 4)
    argv = ["train", "--pretrained", "tiny", "--instance-data", str(data), "--instance-prompt", "a sks dog"]
    argv += ["--num-atoms", "8", "--atom-budget", "2", "--max-steps", "4", "--lr", "0.01", "--quiet"]
    with one_thread():
        assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    adapter = tmp_path / "run" / "adapter"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(0 <= h["zero_share"] <= 1 and h["active_per_token"] <= 8 for h in history)
    assert history[-1]["active_per_token"] <= 2  # after the last cut only 2 atoms can act
    record = json.loads((adapter / "training.json").read_text())
    assert record["sparsity"]["live_atoms_per_module"] == 2
    capsys.readouterr()
    assert main(["inspect", str(adapter)]) == 0
    shown = capsys.readouterr().out
    assert "2.0 per module of a 8-atom dictionary, budget 2" in shown and "atoms active per token" in shown
    with one_thread():
        assert main(["atoms", "--pretrained", "tiny", "--adapter", str(adapter), "--out", str(tmp_path / "a"),
                     "--steps", "2", "--quiet"]) == 0  # fmt: skip
    assert "2.0 live atoms" in capsys.readouterr().out
    rankings = json.loads((tmp_path / "a" / "rankings.json").read_text())
    assert rankings["sparsity"]["mean"]["live_atoms"] == 2


def test_generate_compiled_equals_eager(runs, tmp_path):
    """``generate --compile``: the compiled blocks draw the eager image (steering included), and a
    pipeline passed in gets its eager blocks back."""
    pipe = tiny_pixart_pipeline()
    blocks = list(pipe.transformer.transformer_blocks)
    kwargs = dict(adapters=[runs / "dog" / "adapter"], top_k=4, steps=2)
    eager = generate(GenerateSettings(["a sks dog"], tmp_path / "eager", **kwargs), pipe, progress=False)
    settings = GenerateSettings(["a sks dog"], tmp_path / "compiled", compile=True, **kwargs)
    compiled = generate(settings, pipe, progress=False)
    torch._dynamo.reset()
    assert compiled.metadata["compiled"] and not eager.metadata["compiled"]
    assert _diff(_png(eager.images[0]), _png(compiled.images[0])) <= 3
    base = generate(GenerateSettings(["a sks dog"], tmp_path / "base", steps=2), pipe, progress=False)
    assert _diff(_png(base.images[0]), _png(compiled.images[0])) > 10  # the adapter was active
    assert list(pipe.transformer.transformer_blocks) == blocks
