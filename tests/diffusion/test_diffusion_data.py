"""Instance data, prompts and settings files: what is accepted, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch

from atomtune.diffusion.data import check_prompts, has_token, load_images, read_prompts
from atomtune.diffusion.methods import DEFAULT_NUM_ATOMS, MethodConfig
from atomtune.errors import AtomtuneError
from atomtune.io import list_images
from atomtune.tiny import tiny_pixart
from atomtune.workflows.train import TrainSettings


def _png(path, color=(255, 0, 0), size=(48, 40)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def test_load_images_crops_to_square_in_unit_range(tmp_path):
    _png(tmp_path / "a.png", (255, 0, 0))
    _png(tmp_path / "b.jpg", (0, 0, 255), size=(30, 60))
    (tmp_path / "notes.txt").write_text("not an image")
    pixels = load_images(tmp_path, 16)
    assert pixels.shape == (2, 3, 16, 16)
    assert torch.allclose(pixels[0, 0], torch.ones(16, 16)) and torch.allclose(
        pixels[0, 2], -torch.ones(16, 16)
    )
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[1, 2].mean() > 0.9  # the blue one, sorted second


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "it is empty"),
        (lambda d: (d / "readme.txt").write_text("x"), "none an image"),
        (lambda d: (d / "broken.jpg").write_bytes(b"not a jpeg"), "broken.jpg is not a readable image"),
    ],
)
def test_bad_instance_folders(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(AtomtuneError, match=message):
        load_images(tmp_path, 16)


def test_missing_folder_and_non_image_file(tmp_path):
    with pytest.raises(AtomtuneError, match="folder not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(AtomtuneError, match="is not an image file"):
        list_images(tmp_path / "x.txt")


def test_prompt_token_rules():
    assert has_token("a sks dog", "sks") and has_token("sks, on a beach", "sks")
    assert not has_token("he asks a dog", "sks")
    check_prompts("a sks dog", "sks", "a dog")
    with pytest.raises(AtomtuneError, match="does not contain the unique token 'sks'"):
        check_prompts("a dog", "sks")
    with pytest.raises(AtomtuneError, match="does not contain the unique token"):
        check_prompts("he asks a dog", "sks")
    with pytest.raises(AtomtuneError, match="class prompt 'a sks dog' contains the unique token"):
        check_prompts("a sks dog", "sks", "a sks dog")
    check_prompts("a photo of a cat", None)  # editing: no token


def test_read_prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\na sks dog\n\n  a sks dog in the snow  \n")
    assert read_prompts(["first"], f) == ["first", "a sks dog", "a sks dog in the snow"]
    with pytest.raises(AtomtuneError, match="prompts file not found"):
        read_prompts(None, tmp_path / "missing.txt")


REQUIRED = {"instance_data": "imgs", "instance_prompt": "a sks dog", "output_dir": "out"}


def test_settings_from_yaml_and_toml_with_flags_winning(tmp_path):
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(
        "instance-data: imgs\ninstance_prompt: a sks dog\noutput_dir: out\nmethod: lora\n"
        "epochs: 3\natoms:\n  shrinkage: relu\n"
    )
    s = TrainSettings.build(yaml_file, epochs=7)
    assert (s.method, s.epochs, s.atoms, s.learning_rate) == ("lora", 7, {"shrinkage": "relu"}, 1e-4)
    toml_file = tmp_path / "s.toml"
    toml_file.write_text(
        'instance_data = "imgs"\ninstance_prompt = "a sks dog"\noutput_dir = "out"\n'
        'optimizer = "adamw"\n[atoms]\nlambda_init = 0.01\n'
    )
    s = TrainSettings.build(toml_file)
    assert s.optimizer == "adamw" and s.atoms == {"lambda_init": 0.01} and s.method == "atoms"
    assert (
        s.method_config().describe().startswith(f"atoms: {DEFAULT_NUM_ATOMS['projections']} per projection")
    )  # the projections' default
    assert s.method_config().resolved(tiny_pixart()).atom_config().lambda_init == 0.01


def test_paper_defaults():
    s = TrainSettings(**REQUIRED)
    assert (s.optimizer, s.learning_rate, s.epochs, s.method) == ("came", 1e-4, 15, "atoms")
    assert (s.rank, s.oft_r) == (16, 4)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"method": "lokr"}, "unknown method 'lokr'; choose one of atoms, lora, dora, oft"),
        ({"instance_prompt": "a dog"}, "does not contain the unique token 'sks'"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of no, bf16, fp16"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"optimizer": "sgd"}, "optimizer must be one of came, adamw"),
        ({"atom_budget": -1}, "atom_budget must be an integer >= 0"),
        ({"atoms": {"atom_budget": 3}}, "set atom_budget through its own option"),
        ({"atoms": {"prune_at": [0.5, 0.2]}}, "prune_at must be increasing fractions"),
        ({"atoms": {"lr_exponent": float("nan")}}, "lr_exponent must be in"),
        ({"atoms": {"shrinkage": "hard"}}, "shrinkage must be one of"),
        ({"atoms": {"num_atoms": 8}}, "set num_atoms through its own option"),
        ({"instance_data": ""}, "instance-data is required"),
    ],
)
def test_bad_settings(change, message):
    with pytest.raises(AtomtuneError, match=message.replace("(", r"\(")):
        TrainSettings.from_dict({**REQUIRED, **change})


def test_unknown_setting_and_bad_file(tmp_path):
    with pytest.raises(AtomtuneError, match=r"unknown setting.*: learningrate"):
        TrainSettings.from_dict({**REQUIRED, "learningrate": 1e-3})
    bad = tmp_path / "s.json"
    bad.write_text("{}")
    with pytest.raises(AtomtuneError, match=r"must end in \.yaml, \.yml or \.toml"):
        TrainSettings.build(bad)
    broken = tmp_path / "s.yaml"
    broken.write_text("epochs: [1,\n")
    with pytest.raises(AtomtuneError, match="not valid YAML"):
        TrainSettings.build(broken)
    with pytest.raises(AtomtuneError, match="unknown method"):
        MethodConfig("full")
