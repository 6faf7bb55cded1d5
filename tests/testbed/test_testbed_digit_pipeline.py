"""The testbed model plugs into the shared workflows: the one trainer trains atoms on it and
generate draws with the adapter (random weights here; the pretrained checkpoint is not needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from atomtune.diffusion.spec import spec_for
from atomtune.errors import AtomtuneError
from atomtune.testbed.digit_pipeline import DigitSpec, digit_pipeline
from atomtune.testbed.digits import Attributes, load_digits, render
from atomtune.testbed.model import build_transformer, load_digit_transformer
from atomtune.workflows.train import TrainSettings, train


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "digit_dit.safetensors"
    save_file({k: v.contiguous() for k, v in build_transformer(seed=3).state_dict().items()}, str(path))
    return path


def test_pipeline_spec_and_sampling(weights):
    pipe = digit_pipeline(weights)
    spec = spec_for(pipe)
    assert isinstance(spec, DigitSpec) and spec.native_resolution == 24
    a = pipe(["a large red seven", "a small blue one in the top left corner"], [1, 2], steps=3)
    b = pipe(["a large red seven", "a small blue one in the top left corner"], [1, 2], steps=3)
    assert a.shape == (2, 3, 24, 24) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    prompts = spec.encode_prompts(["a sks digit", ""])
    assert prompts.embeds.shape == (2, 16, 384) and prompts.mask[1].sum() == 2  # [CLS] [SEP]
    image = spec.generate(prompts.select([0]), prompts.select([1]), 4, 3, 3.0, 24, 24)
    assert image.size == (24, 24)


def test_missing_weights_error(tmp_path):
    with pytest.raises(AtomtuneError, match="testbed weights not found"):
        load_digit_transformer(tmp_path / "none.safetensors")


def test_the_one_trainer_trains_atoms_on_the_testbed(weights, tmp_path):
    images, labels = load_digits()
    folder = tmp_path / "nines"
    folder.mkdir()
    for i, idx in enumerate(np.flatnonzero(labels == 9)[:5]):
        x = (render(images[idx], Attributes(9, "white", "large", "in the center")) + 1) / 2
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    pipe = digit_pipeline(weights)
    before = pipe(["a sks digit"], [0], steps=3)
    settings = TrainSettings.build(
        instance_data=str(folder),
        instance_prompt="a sks digit",
        output_dir=str(tmp_path / "run"),
        pretrained="digits",
        num_atoms=12,  # a multiple of the 6 heads
        max_steps=3,
        optimizer="adamw",
        learning_rate=1e-2,
        seed=0,
    )
    result = train(settings, pipe=pipe, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file() and len(result.history) == 3
    after = pipe(["a sks digit"], [0], steps=3)  # the pipeline keeps the trained adapter
    assert (after - before).abs().max() > 1e-4


def test_testbed_cli_rejects_bad_settings(capsys):
    from atomtune.cli import main

    assert main(["testbed", "pretrain", "--out", "unused", "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert main(["testbed", "pretrain", "--out", "unused", "--holdout-digit", "12"]) == 2


def test_a_concept_taught_through_a_few_atoms_is_measured_as_carried_by_few(weights, tmp_path):
    """The atom budget on the testbed: 12 atoms per module cut to 2 while training. Sampling the
    concept afterwards, the statistics (what ``atomtune atoms`` reports) find 2 live atoms carrying
    all of each module's contribution; the same run without a cut spreads over more atoms."""
    from atomtune.testbed import customize as cz
    from atomtune.workflows.analyze import calibrate

    images, labels = load_digits()
    folder = tmp_path / "nines"
    folder.mkdir()
    for i, idx in enumerate(np.flatnonzero(labels == 9)[:4]):
        x = (render(images[idx], Attributes(9, "white", "large", "in the center")) + 1) / 2
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(folder / f"{i}.png")

    def sparsity(budget: int) -> dict:
        pipe = digit_pipeline(weights)
        settings = TrainSettings.build(
            instance_data=str(folder), instance_prompt="a sks digit", output_dir=str(tmp_path / f"b{budget}"),
            pretrained="digits", num_atoms=12, atom_budget=budget, max_steps=8, optimizer="adamw",
            learning_rate=1e-2, seed=0,
        )  # fmt: skip
        tuned = train(settings, pipe=pipe, progress=False).tuned
        stats, _ = calibrate(spec_for(pipe), tuned, ["a sks digit"], [0], 3, cz.GUIDANCE, 24, 24)
        measured = stats.sparsity()["mean"]
        tuned.unload()
        return measured

    few, dense = sparsity(2), sparsity(0)
    assert few["live_atoms"] == 2 and few["atoms_for_share"] <= 2
    assert dense["live_atoms"] == 12 and dense["atoms_for_share"] > few["atoms_for_share"]
