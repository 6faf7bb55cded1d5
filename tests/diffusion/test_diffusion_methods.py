"""The four methods on a PixArt transformer: identity at start, save → load, the paper's baseline
settings, unloading, and refusing an adapter made for another model."""

from __future__ import annotations

import json

import pytest
import torch

from atomtune.diffusion.adapters import load_adapters, read_adapter_info
from atomtune.diffusion.methods import DEFAULT_NUM_ATOMS, METHODS, MethodConfig, apply_method
from atomtune.errors import AtomtuneError
from atomtune.tiny import tiny_pixart, tiny_pixart_inputs
from diffusion_helpers import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _perturb(tuned, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("method", METHODS)
def test_identity_save_load_unload(method, tmp_path):
    model, inputs = tiny_pixart(), tiny_pixart_inputs()
    base = _out(model, inputs)
    tuned = apply_method(model, MethodConfig(method, num_atoms=8), "tiny")
    assert tuned.num_trainable_parameters() > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if "to_q.weight" in n)
    assert torch.allclose(_out(model, inputs), base, atol=1e-6)  # the pretrained model at step 0
    _perturb(tuned)
    adapted = _out(model, inputs)
    assert (adapted - base).abs().max() > 1e-3
    with tuned.disable():
        assert torch.allclose(_out(model, inputs), base, atol=1e-6)
    tuned.save(tmp_path / "adapter")
    info = read_adapter_info(tmp_path / "adapter")
    assert info["method"] == method and info["base_model"]["pretrained"] == "tiny"
    assert len(info["base_model"]["projections"]) == 16  # 2 blocks x 2 attentions x 4 projections

    fresh = tiny_pixart()
    loaded = load_adapters(fresh, [tmp_path / "adapter"], "tiny")
    assert loaded.method == method
    assert torch.allclose(_out(fresh, inputs), adapted, atol=1e-5)
    loaded.unload()
    assert torch.allclose(_out(fresh, inputs), base, atol=1e-6)
    assert sorted(n for n, _ in fresh.named_parameters()) == sorted(
        n for n, _ in tiny_pixart().named_parameters()
    )


def test_baselines_use_the_papers_settings_on_the_same_modules(tmp_path):
    shapes = {}
    for method in ("lora", "dora", "oft"):
        model = tiny_pixart()
        apply_method(model, MethodConfig(method), "tiny").save(tmp_path / method)
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
        shapes[method] = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        if method == "oft":
            assert config["peft_type"] == "OFT" and config["r"] == 4
        else:
            assert (
                config["peft_type"] == "LORA"
                and config["r"] == 16
                and config["use_dora"] == (method == "dora")
            )
    lora_a = [s for n, s in shapes["lora"].items() if "lora_A" in n]
    assert len(lora_a) == 16 and all(s[0] == 16 for s in lora_a)  # rank 16 on all 16 projections
    assert any("magnitude" in n for n in shapes["dora"]) and not any("magnitude" in n for n in shapes["lora"])


@pytest.mark.parametrize("method", ["atoms", "lora"])
def test_adapter_for_another_model_is_refused(method, tmp_path):
    apply_method(tiny_pixart(), MethodConfig(method, num_atoms=8), "tiny").save(tmp_path / "a")
    other = tiny_pixart(head_dim=16)
    before = {n: p.clone() for n, p in other.state_dict().items()}
    with pytest.raises(AtomtuneError, match=r"is for another model: it was trained on tiny, where .*16x16"):
        load_adapters(other, [tmp_path / "a"], "bigger")
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_several_adapters_act_together_and_methods_do_not_mix(tmp_path):
    inputs = tiny_pixart_inputs()
    deltas = []
    for i in range(2):
        model = tiny_pixart()
        base = _out(model, inputs)
        tuned = apply_method(model, MethodConfig("lora"), "tiny")
        _perturb(tuned, seed=i, scale=0.01)  # small updates: the model is nearly linear in them
        deltas.append(_out(model, inputs) - base)
        tuned.save(tmp_path / f"lora{i}")
    apply_method(tiny_pixart(), MethodConfig("atoms", num_atoms=8), "tiny").save(tmp_path / "atoms")
    model = tiny_pixart()
    base = _out(model, inputs)
    both = load_adapters(model, [tmp_path / "lora0", tmp_path / "lora1"], "tiny")
    combined = _out(model, inputs) - base
    error = (combined - deltas[0] - deltas[1]).abs().max()
    assert error < 0.1 * min((combined - d).abs().max() for d in deltas)  # both act, their updates add
    both.unload()
    with pytest.raises(AtomtuneError, match="adapters of different methods cannot act together"):
        load_adapters(model, [tmp_path / "lora0", tmp_path / "atoms"], "tiny")
    with pytest.raises(AtomtuneError, match="adapter folder not found"):
        load_adapters(model, [tmp_path / "missing"], "tiny")


@pytest.mark.parametrize("method", ["atoms", "lora"])
def test_first_only_modules_run_the_first_adapter_alone(method, tmp_path):
    """With ``first_only``, self-attention's queries see the first adapter alone; every other
    projection sees both, for atoms (merged) and PEFT (activated per layer) alike."""
    x = torch.randn(2, 5, tiny_pixart().transformer_blocks[0].attn1.to_q.in_features)
    for i in range(2):
        tuned = apply_method(tiny_pixart(), MethodConfig(method, num_atoms=8, atom_budget=0), "tiny")
        _perturb(tuned, seed=i, scale=0.3)
        tuned.save(tmp_path / f"a{i}")

    def projections(dirs, **kwargs):
        model = tiny_pixart()
        tuned = load_adapters(model, dirs, "tiny", **kwargs)
        attn1, attn2 = model.transformer_blocks[0].attn1, model.transformer_blocks[0].attn2
        with torch.no_grad():
            outs = {"q": attn1.to_q(x), "k": attn1.to_k(x), "cross q": attn2.to_q(x)}
        tuned.unload()
        return outs

    first = projections([tmp_path / "a0"])
    both = projections([tmp_path / "a0", tmp_path / "a1"])
    kept = projections([tmp_path / "a0", tmp_path / "a1"], first_only=["attn1.to_q"])
    assert torch.allclose(kept["q"], first["q"], atol=1e-6)
    assert not torch.allclose(both["q"], first["q"], atol=1e-3)
    for name in ("k", "cross q"):
        assert torch.allclose(kept[name], both[name], atol=1e-6)
    model = tiny_pixart()
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(AtomtuneError, match=r"no adapted module has 'attn9\.to_q' in its name"):
        load_adapters(model, [tmp_path / "a0", tmp_path / "a1"], "tiny", first_only=["attn9.to_q"])
    assert {n for n, _ in model.named_modules()} == before  # nothing left injected


def test_projection_atoms_go_where_the_host_spec_says_and_the_description_names_them():
    tuned = apply_method(tiny_pixart(), MethodConfig(num_atoms=4), "tiny", target_modules=("to_q", "to_v"))
    names = list(tuned.handle.atoms())
    assert names and all(n.endswith((".to_q", ".to_v")) for n in names) and len(names) == 2 * 2 * 2
    assert tuned.target_modules == ("to_q", "to_v")
    text = MethodConfig(num_atoms=8, atom_budget=6).describe(tuned.target_modules)
    assert text.startswith("atoms: 8 per projection on to_q, to_v, cut to 6 by contribution")
    attention = MethodConfig(num_atoms=4, form="attention").describe()
    assert "per attention module (both-attention, pre_out)" in attention
    assert (
        MethodConfig(form="attention").num_atoms == "parity"
        and MethodConfig().num_atoms == DEFAULT_NUM_ATOMS["projections"]
    )
