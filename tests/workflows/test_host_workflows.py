"""The five commands end to end on the tiny SD3, Flux and Sana pipelines, through the CLI as a user runs
them (train atoms and LoRA → generate → atoms + sweep → edit → merge), and the adapted pipeline at step
0 drawing the pretrained one's image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from atomtune.cli import main
from atomtune.diffusion.methods import MethodConfig, apply_method
from atomtune.diffusion.pipeline import load_pipeline
from atomtune.diffusion.spec import spec_for
from atomtune.workflows.generate import GenerateSettings, generate
from diffusion_helpers import dreambooth_images, one_thread

HOSTS = ["tiny-sd3", "tiny-flux", "tiny-sana"]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _diff(a, b) -> int:
    """Largest difference of two uint8 images (equal computations by different code paths may differ
    in the last float bits: within 3 levels; a real change moves pixels by tens of levels)."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _atom_modules(adapter) -> list[str]:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return sorted(k.removesuffix(".W_s") for k in tensors if k.endswith(".W_s"))


@pytest.fixture(scope="module", params=HOSTS)
def runs(request, tmp_path_factory):
    """Per host: a concept adapter (dog), a style adapter (cartoon) and a LoRA, trained via the CLI."""
    host = request.param
    root = tmp_path_factory.mktemp(host)
    dog = dreambooth_images(root / "data" / "dog", "dog", 3)
    cartoon = dreambooth_images(root / "data" / "red_cartoon", "red_cartoon", 2)
    common = ["train", "--pretrained", host, "--max-steps", "3", "--lr", "0.01", "--quiet"]
    atoms = ["--num-atoms", "8", "--atom-budget", "0"]
    with one_thread():
        for data, prompt, out, method in (
            (dog, "a sks dog", "dog", atoms),
            (cartoon, "a sks cartoon", "style", atoms),
            (dog, "a sks dog", "lora", ["--method", "lora", "--rank", "4"]),
        ):
            argv = [*common, *method, "--instance-data", str(data), "--instance-prompt", prompt]
            assert main([*argv, "--output-dir", str(root / out)]) == 0
    return host, root


def test_train_writes_atoms_and_lora_at_the_hosts_targets(runs):
    host, root = runs
    record = json.loads((root / "dog" / "adapter" / "training.json").read_text())
    assert record["base_model"] == host and record["steps"] == 3
    history = json.loads((root / "dog" / "history.json").read_text())
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert any(h["l1"] > 0 for h in history)  # the atoms' penalty is in the loss
    spec = spec_for(load_pipeline(host, device="cpu"))
    config = json.loads((root / "lora" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(spec.target_modules)
    lora = json.loads((root / "lora" / "adapter" / "training.json").read_text())
    assert all(t in lora["method_description"] for t in spec.target_modules)
    tensors = load_file(str(root / "lora" / "adapter" / "adapter_model.safetensors"))
    adapted = {k.split(".lora_")[0] for k in tensors}
    assert all(any(name.endswith(t) for t in spec.target_modules) for name in adapted)
    assert len(adapted) >= len(spec.target_modules)


def test_generate_with_atoms_lora_masks_and_gains(runs, tmp_path):
    host, root = runs
    pipe = load_pipeline(host, device="cpu")

    def image(name, **kwargs):
        settings = GenerateSettings(["a sks dog"], tmp_path / name, pretrained=host, steps=2, **kwargs)
        return _png(generate(settings, pipe, progress=False).images[0])

    base = image("base")
    full = image("full", adapters=[root / "dog" / "adapter"])
    assert base.shape == (32, 32, 3) and _diff(base, full) > 10  # the trained atoms change the image
    assert _diff(image("none", adapters=[root / "dog" / "adapter"], top_k=0), base) <= 3
    assert np.array_equal(image("all", adapters=[root / "dog" / "adapter"], top_k=8), full)
    modules = _atom_modules(root / "dog" / "adapter")
    gains = [f"{m}:{a}=0" for m in modules for a in range(8)]
    assert _diff(image("gain", adapters=[root / "dog" / "adapter"], gains=gains), base) <= 3
    assert _diff(image("lora", adapters=[root / "lora" / "adapter"]), base) > 10
    assert np.array_equal(image("after"), base)  # the pipeline came back without adapters


def test_atoms_rankings_and_sweep(runs, tmp_path, capsys):
    host, root = runs
    out = tmp_path / "atoms"
    argv = ["atoms", "--pretrained", host, "--device", "cpu", "--adapter", str(root / "dog" / "adapter")]
    assert main([*argv, "--steps", "2", "--sweep", "--quiet", "--out", str(out)]) == 0
    assert "k = 1, 2, 4, 8" in capsys.readouterr().out
    rankings = json.loads((out / "rankings.json").read_text())
    assert sorted(rankings["modules"]) == _atom_modules(root / "dog" / "adapter")
    assert len(rankings["timesteps"]) == 2
    for entry in rankings["modules"].values():
        assert sorted(entry["atom_ids"]) == list(range(8)) and entry["tokens"] > 0
    strip = [_png(out / "sweep" / f"k-{k:04d}.png") for k in (1, 2, 4, 8)]
    full = generate(
        GenerateSettings(["a sks dog"], tmp_path / "full", adapters=[root / "dog" / "adapter"], steps=2),
        load_pipeline(host, device="cpu"),
        progress=False,
    )
    assert np.array_equal(strip[-1], _png(full.images[0]))  # all atoms = the adapter as trained


def test_edit_writes_the_tradeoff_grid(runs, tmp_path):
    host, root = runs
    image = sorted((root / "data" / "dog").iterdir())[0]
    out = tmp_path / "edit"
    argv = ["edit", "--pretrained", host, "--device", "cpu", "--image", str(image)]
    argv += ["--source-prompt", "a photo of a dog", "--target-prompt", "a dog in a hat", "--epochs", "2"]
    assert main([*argv, "--num-atoms", "8", "--ks", "1", "--steps", "2", "--lr", "0.01", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    meta = json.loads((out / "edit.json").read_text())
    assert meta["columns"] == ["all 8", "k=1", "base"]
    base = generate(
        GenerateSettings(["a dog in a hat"], tmp_path / "b", steps=2),
        load_pipeline(host, device="cpu"),
        progress=False,
    )
    assert _diff(_png(out / "images" / "target01-base.png"), _png(base.images[0])) <= 3
    assert _diff(_png(out / "images" / "target01-all8.png"), _png(base.images[0])) > 10


def test_merge_concat_draws_both_adapters_together(runs, tmp_path, capsys):
    host, root = runs
    concept, style = root / "dog" / "adapter", root / "style" / "adapter"
    out = tmp_path / "merged"
    argv = ["merge", "--pretrained", host, "--device", "cpu", str(concept), str(style), "--how", "concat"]
    assert main([*argv, "--top-k", "3", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "overlap.json").read_text())
    assert sorted(report["modules"]) == _atom_modules(concept) and "mean" in capsys.readouterr().out
    pipe = load_pipeline(host, device="cpu")
    one = generate(
        GenerateSettings(["a sks dog"], tmp_path / "one", adapters=[out], steps=2), pipe, progress=False
    )
    both = generate(
        GenerateSettings(["a sks dog"], tmp_path / "two", adapters=[concept, style], steps=2),
        pipe,
        progress=False,
    )
    assert np.array_equal(_png(one.images[0]), _png(both.images[0]))


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("method", ["atoms", "lora"])
def test_adapted_pipeline_at_step_0_is_the_pretrained_one(host, method):
    pipe = load_pipeline(host, device="cpu")
    spec = spec_for(pipe)
    prompts, negative = spec.encode_prompts(["a sks dog"]), spec.encode_prompts([""])
    latents = spec.latents(*spec.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1), torch.zeros(1))
    noised = spec.add_noise(latents, torch.randn(latents.shape), torch.Generator().manual_seed(0))

    def outputs():
        with torch.no_grad():
            pred = spec.predict_noise(pipe.transformer, noised.noisy, noised.timesteps, prompts)
        return pred, np.asarray(spec.generate(prompts, negative, 0, 2, 4.5, 32, 32))

    pred, image = outputs()
    tuned = apply_method(
        pipe.transformer, MethodConfig(method, num_atoms=8), host, target_modules=spec.target_modules
    )
    assert tuned.num_trainable_parameters() > 0
    adapted_pred, adapted_image = outputs()
    torch.testing.assert_close(adapted_pred, pred, atol=1e-6, rtol=0)
    assert _diff(adapted_image, image) <= 1


def test_readme_host_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The Hosts section's commands, verbatim (the DreamBooth folder resolved), from a scratch folder."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### The workflows on SD3, Flux and Sana", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```console\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line[2:]) for line in block.splitlines() if line.startswith("$ atomtune ")]
    assert {c[c.index("--pretrained") + 1] for c in commands} == set(HOSTS)
    data = dreambooth_images(tmp_path / "data" / "dog", "dog", 3).parent
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        argv = [a.replace("$DATA", str(data)) for a in argv[1:]]
        assert main([*argv, "--quiet"]) == 0, argv
    capsys.readouterr()
    for path in ("out/sd3/grid.png", "out/flux/grid.png", "out/sana-atoms/sweep.png"):
        assert (tmp_path / path).is_file(), path


@pytest.mark.parametrize("host", ["tiny-sd3", "tiny-flux"])
def test_training_parks_every_text_encoder(host):
    """On an accelerator all of a host's text encoders (SD3: three, Flux: two) leave the pipeline
    while training runs, and come back, the same modules, afterwards."""
    from atomtune.workflows.train.loop import text_encoders_parked

    pipe = load_pipeline(host, "float32", None, "cpu")
    names = [n for n in pipe.components if n.startswith("text_encoder")]
    before = {n: getattr(pipe, n) for n in names}
    assert len(names) >= 2 and all(before.values())
    with text_encoders_parked(pipe, park=True):
        assert all(getattr(pipe, n) is None for n in names)
    assert all(getattr(pipe, n) is before[n] for n in names)
    with text_encoders_parked(pipe, park=False):  # on the CPU they stay
        assert all(getattr(pipe, n) is before[n] for n in names)
