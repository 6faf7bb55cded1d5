"""Atoms through PEFT's own API: the same outputs and gradients as ``AtomModel`` (float64, 1e-10),
``save_pretrained`` → ``PeftModel.from_pretrained``, named adapters, disabling, unloading, the merge
refusal and one-line errors for bad input."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft_helpers import (
    atom_config,
    copy_atoms,
    move_every_tensor,
    peft_config,
    pixart,
    pixart_inputs,
    run,
    same_atoms,
    twins,
)
from safetensors.torch import load_file, save_file

from atomtune import AtomModel
from atomtune.errors import AtomtuneError
from atomtune.peft import AtomsLayer, AtomsPeftConfig, atoms_of
from atomtune.tiny import tiny_causal_lm, tiny_pixart, tiny_sd3

TOL = 1e-10


def _key(name: str) -> str:
    """One name for a tensor in either handle: ``<module>.<tensor>``."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".atoms_dict.default.", ".").replace(".atoms.adapters.default.", ".")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in _trainable(model).items()}


@pytest.mark.parametrize("shrinkage", ["soft", "topk"])
def test_outputs_and_gradients_equal_atom_model_at_step_zero_and_after_moving_every_tensor(shrinkage):
    reference, peft_model = twins(shrinkage=shrinkage, topk=3)
    inputs = pixart_inputs()
    bare = run(pixart(), inputs)
    assert _shapes(peft_model) == _shapes(reference.model)  # same tensors train, same shapes
    assert (run(peft_model, inputs) - run(reference.model, inputs)).abs().max() < TOL
    assert (run(peft_model, inputs) - bare).abs().max() < TOL  # D = 0: the pretrained model

    move_every_tensor(reference, seed=5)
    copy_atoms(reference, atoms_of(peft_model))
    moved = run(reference.model, inputs)
    assert (moved - bare).abs().max() > 1e-3  # the atoms act
    assert (run(peft_model, inputs) - moved).abs().max() < TOL

    grads = []
    for model in (reference.model, peft_model):
        model(**inputs).sample.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in _trainable(model).items()})
    assert sorted(grads[0]) == sorted(grads[1])
    for name, grad in grads[1].items():  # (λ gets no gradient under top-k, in either)
        assert (grad is None) == (grads[0][name] is None), name
        assert grad is None or (grad - grads[0][name]).abs().max() < TOL, name
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads[1].values()) >= len(grads[1]) * 2 // 3


def test_gpt2_conv1d_layers_equal_atom_model():
    targets = ["c_attn", "c_fc"]
    reference = AtomModel(tiny_causal_lm("gpt2").double(), atom_config(targets))
    peft_model = get_peft_model(tiny_causal_lm("gpt2").double(), peft_config(targets))
    move_every_tensor(reference, seed=2)
    copy_atoms(reference, atoms_of(peft_model))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference.model(ids).logits, peft_model(input_ids=ids).logits
    assert (expected - tiny_causal_lm("gpt2").double()(ids).logits).abs().max() > 1e-3
    assert (got - expected).abs().max() < TOL


def test_fixed_lambda_stays_fixed_as_in_atom_model():
    reference, peft_model = twins(learn_lambda=False)
    assert _shapes(peft_model) == _shapes(reference.model)
    assert not any(atoms.lam.requires_grad for atoms in atoms_of(peft_model).atoms().values())
    peft_model.set_adapter("default")  # PEFT's switch makes the adapter trainable: λ still not
    assert not any(atoms.lam.requires_grad for atoms in atoms_of(peft_model).atoms().values())


def test_save_pretrained_then_from_pretrained_on_a_fresh_model_gives_identical_outputs(tmp_path):
    _, peft_model = twins()
    move_every_tensor(atoms_of(peft_model), seed=7)
    inputs = pixart_inputs()
    expected = run(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(pixart(), tmp_path)
    assert torch.equal(run(loaded, inputs), expected)
    assert same_atoms(atoms_of(loaded), atoms_of(peft_model))  # masks, gains and ids too
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT's default: for inference
    trainable = PeftModel.from_pretrained(pixart(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == peft_model.get_nb_trainable_parameters()[0]
    lean = PeftModel.from_pretrained(pixart(), tmp_path, low_cpu_mem_usage=True)  # built on meta, then loaded
    assert torch.equal(run(lean, inputs), expected)


def test_named_adapters_set_adapter_disable_adapter_and_unload():
    reference, peft_model = twins()
    move_every_tensor(reference, seed=1)
    copy_atoms(reference, atoms_of(peft_model))
    reference.add_adapter("style", atom_config())
    peft_model.add_adapter("style", peft_config())
    peft_model.set_adapter("style")
    move_every_tensor(reference, seed=2)  # reference's active adapter is "style" now
    copy_atoms(reference, atoms_of(peft_model), "style")
    inputs = pixart_inputs()
    bare = run(pixart(), inputs)

    style = run(peft_model, inputs)
    assert (style - run(reference.model, inputs)).abs().max() < TOL
    assert all(".style." in n for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.set_adapter("default")
    reference.set_adapter("default")
    assert (run(peft_model, inputs) - run(reference.model, inputs)).abs().max() < TOL
    assert (run(peft_model, inputs) - style).abs().max() > 1e-3

    with peft_model.disable_adapter():
        assert (run(peft_model, inputs) - bare).abs().max() < TOL
    assert (run(peft_model, inputs) - run(reference.model, inputs)).abs().max() < TOL

    model = peft_model.unload()
    assert not any(isinstance(m, AtomsLayer) for m in model.modules())
    assert not any("atoms" in n for n, _ in model.named_parameters())
    assert (run(model, inputs) - bare).abs().max() < TOL


def test_merge_and_unload_refuses_in_one_line_and_leaves_the_model_as_it_was():
    _, peft_model = twins()
    move_every_tensor(atoms_of(peft_model), seed=3)
    inputs = pixart_inputs()
    before = run(peft_model, inputs)
    for merge in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(AtomtuneError, match="no weight change") as caught:
            merge()
        assert "\n" not in str(caught.value)
    assert torch.equal(run(peft_model, inputs), before)


def _one_line(error, message, action):
    with pytest.raises(error, match=message) as caught:
        action()
    assert "\n" not in str(caught.value), str(caught.value)


def test_bad_input_is_one_clear_line(tmp_path):
    _one_line(AtomtuneError, "needs target_modules", lambda: AtomsPeftConfig(num_atoms=4))
    _one_line(AtomtuneError, "shrinkage must be one of", lambda: peft_config(shrinkage="hard"))
    _one_line(AtomtuneError, "num_atoms must be a positive", lambda: peft_config(num_atoms=0))
    _one_line(AtomtuneError, "atoms_pattern must map", lambda: peft_config(atoms_pattern={"to_q": 0}))
    _one_line(
        ValueError, "not found in the base model", lambda: get_peft_model(pixart(), peft_config(["nope"]))
    )
    _one_line(
        AtomtuneError, "atoms adapt nn.Linear", lambda: get_peft_model(pixart(), peft_config(["attn1"]))
    )

    _, peft_model = twins()
    peft_model.save_pretrained(tmp_path)
    wider = tiny_pixart(head_dim=4).double()  # the same module names, other widths
    _one_line(AtomtuneError, "saved from another model", lambda: PeftModel.from_pretrained(wider, tmp_path))
    sd3 = tiny_sd3()  # its attention has to_q, to_k, to_v, to_out.0 too, under other names
    _one_line(AtomtuneError, "has no place in the model", lambda: PeftModel.from_pretrained(sd3, tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not k.endswith("attn2.to_v.atoms_dict.gain")}, weights)
    _one_line(
        AtomtuneError, "the adapter lacks tensor", lambda: PeftModel.from_pretrained(pixart(), tmp_path)
    )
