"""save → load reproduces outputs bit-exactly; wrong models and broken files fail with clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from atomtune import AtomConfig, AtomModel, AtomtuneError
from atomtune.core.serialization import CONFIG_NAME, WEIGHTS_NAME
from atomtune.tiny import tiny_causal_lm, tiny_pixart
from conftest import randomize_atoms, run_pixart


@pytest.fixture
def saved(tmp_path, pixart, pixart_inputs):
    atoms = AtomModel(pixart, AtomConfig(num_atoms=8, placement="post_out"))
    randomize_atoms(atoms)
    with torch.no_grad():
        for a in atoms.atoms().values():
            a.lam.fill_(0.02)
            a.mask[3] = 0
            a.gain[1] = -1.5
    atoms.save(tmp_path / "ad")
    return tmp_path / "ad", run_pixart(pixart, pixart_inputs)


def test_round_trip_is_bit_exact(saved, pixart_inputs):
    folder, expected = saved
    fresh = tiny_pixart(seed=0)
    loaded = AtomModel.load(fresh, folder)
    assert torch.equal(run_pixart(fresh, pixart_inputs), expected)
    assert loaded.configs["default"].placement == "post_out"
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["base_model"]["class"].endswith("PixArtTransformer2DModel")
    assert meta["modules"]["transformer_blocks.0.attn2"]["num_atoms"] == 8
    assert set(meta) >= {"atomtune_version", "config", "modules", "format_version"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_linear_mode(tmp_path):
    model = tiny_causal_lm("gpt2")
    atoms = AtomModel(model, AtomConfig(mode="linear", target_modules=r"c_fc", num_atoms=4))
    randomize_atoms(atoms)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
    atoms.save(tmp_path)
    fresh = tiny_causal_lm("gpt2")
    AtomModel.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_model_of_other_shape_is_refused(saved):
    folder, _ = saved
    other = tiny_pixart(heads=2, head_dim=16)
    with pytest.raises(
        AtomtuneError, match=r"module transformer_blocks\.0\.attn1: adapter has in_features=16, model has 32"
    ):
        AtomModel.load(other, folder)
    # the refused model is left without adapters
    assert not any(".atoms." in n for n, _ in other.named_parameters())


def test_model_with_fewer_layers_is_refused(saved):
    folder, _ = saved
    with pytest.raises(AtomtuneError, match=r"no adaptable module 'transformer_blocks\.1\.attn1'"):
        AtomModel.load(tiny_pixart(layers=1), folder)


def test_model_of_other_class_is_refused(saved):
    folder, _ = saved
    with pytest.raises(
        AtomtuneError, match=r"adapter was trained on .*PixArtTransformer2DModel, not on .*GPT2LMHeadModel"
    ):
        AtomModel.load(tiny_causal_lm("gpt2"), folder)


def test_truncated_weights_are_refused(saved):
    folder, _ = saved
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AtomtuneError, match="not a readable safetensors file"):
        AtomModel.load(tiny_pixart(), folder)


def test_unknown_config_field_is_refused(saved):
    folder, _ = saved
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["config"]["num_atomz"] = 3
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AtomtuneError, match=r"unknown AtomConfig field.*num_atomz"):
        AtomModel.load(tiny_pixart(), folder)


def test_missing_tensor_and_bad_json_and_missing_folder(saved, tmp_path):
    folder, _ = saved
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_NAME)
    del tensors["transformer_blocks.1.attn2.D"]
    save_file(tensors, folder / WEIGHTS_NAME)
    with pytest.raises(AtomtuneError, match=r"lacks tensor transformer_blocks\.1\.attn2\.D"):
        AtomModel.load(tiny_pixart(), folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AtomtuneError, match="not valid JSON"):
        AtomModel.load(tiny_pixart(), folder)
    with pytest.raises(AtomtuneError, match="adapter folder not found"):
        AtomModel.load(tiny_pixart(), tmp_path / "nope")


def test_failed_save_keeps_the_previous_files(saved, monkeypatch):
    folder, _ = saved
    before = (folder / WEIGHTS_NAME).read_bytes()
    atoms = AtomModel(tiny_pixart(), AtomConfig(num_atoms=4))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("atomtune.core.serialization.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        atoms.save(folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_config_validation():
    with pytest.raises(AtomtuneError, match="shrinkage must be one of soft, relu, topk; got 'hard'"):
        AtomConfig(shrinkage="hard")
    with pytest.raises(AtomtuneError, match="linear mode needs target_modules"):
        AtomConfig(mode="linear")
    assert AtomConfig.from_dict(AtomConfig(num_atoms=4).to_dict()) == AtomConfig(num_atoms=4)
