"""``AtomModel``'s operations on a PEFT-wrapped model (importance, masks, gains, top-k, prune, the
regularisation), atomtune's adapter folders into the PEFT path and back, and diffusers'
``add_adapter`` round trip on a tiny PixArt and a tiny SD3."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, inject_adapter_in_model
from peft_helpers import (
    SD3_TARGETS,
    TARGETS,
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

from atomtune import AtomConfig, AtomModel
from atomtune.core.budget import AtomBudgetRun
from atomtune.core.selection import top_k_masks
from atomtune.core.stats import AtomStatistics, weight_importance
from atomtune.errors import AtomtuneError
from atomtune.peft import atoms_of, load_adapter, save_adapter
from atomtune.tiny import sd3_inputs, tiny_sd3

TOL = 1e-10


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() < TOL)


def test_importance_masks_gains_top_k_and_prune_as_on_atom_model(tmp_path):
    reference, peft_model = twins()
    move_every_tensor(reference, seed=8, steer=False)
    view = atoms_of(peft_model)
    copy_atoms(reference, view)
    inputs = pixart_inputs()

    for handle in (reference, view):
        handle.model(**inputs).sample.sum()  # a training forward: the L1 term reads its coefficients
    assert torch.equal(view.regularization_loss(), reference.regularization_loss())
    assert view.num_trainable_parameters() == reference.num_trainable_parameters()

    stats = []
    for handle in (reference, view):
        with torch.no_grad(), AtomStatistics(handle) as s:
            handle.model(**inputs)
        stats.append(s)
    assert stats[0].report() == stats[1].report()  # contribution, frequency and ids, atom by atom
    assert all(torch.equal(a, weight_importance(view)[n]) for n, a in weight_importance(reference).items())

    masks = top_k_masks(stats[1].contribution(), k=3)
    top = stats[1].report()["transformer_blocks.1.attn2.to_v"]["atom_ids"][0]
    for handle in (reference, view):
        handle.set_masks(masks)
        handle.set_gains({"transformer_blocks.1.attn2.to_v": {top: 2.5}})
    steered = run(reference.model, inputs)
    assert _close(run(peft_model, inputs), steered)
    assert (steered - run(pixart(), inputs)).abs().max() > 1e-3

    assert view.prune() == reference.prune() == dict.fromkeys(reference.atoms(), 3)
    assert _close(run(peft_model, inputs), steered)  # pruning keeps the outputs
    assert peft_model.peft_config["default"].atoms_pattern == dict.fromkeys(reference.atoms(), 3)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(pixart(), tmp_path)  # the pruned sizes come back from the config
    assert torch.equal(run(loaded, inputs), run(peft_model, inputs))
    assert same_atoms(atoms_of(loaded), reference)


def test_atom_budget_runs_on_the_peft_model_as_on_atom_model():
    reference, peft_model = twins(num_atoms=8, atom_budget=2)
    inputs = pixart_inputs()
    handles = (reference, atoms_of(peft_model))
    runs = [AtomBudgetRun.start(handle, total_steps=4, seed=0) for handle in handles]
    for step in range(1, 5):
        for handle, budget in zip(handles, runs, strict=True):
            with torch.no_grad():
                for atoms in handle.atoms().values():  # the same "training step" on both
                    atoms.D.add_(0.1 * step * atoms.W_s[:1].T.mean() + 0.01)
            (handle.model(**inputs).sample.pow(2).mean() + handle.regularization_loss()).backward()
            budget.after_step(step)
    for budget in runs:
        budget.finish()
    assert same_atoms(*handles) and all(a.num_atoms == 2 for a in handles[1].atoms().values())
    assert peft_model.peft_config["default"].atoms_pattern == dict.fromkeys(reference.atoms(), 2)
    assert _close(run(peft_model, inputs), run(reference.model, inputs))


def test_atomtune_folders_load_into_the_peft_path_and_back_exactly(tmp_path):
    reference = AtomModel(
        pixart(), AtomConfig(mode="linear", target_modules=r"attn\d\.to_(q|v)$", num_atoms=5)
    )
    move_every_tensor(reference, seed=9)
    reference.save(tmp_path / "ours")
    inputs = pixart_inputs()
    expected = run(reference.model, inputs)

    model = pixart()  # a bare model: the atoms go in place, as add_adapter would put them
    assert load_adapter(model, tmp_path / "ours") is model
    assert _close(run(model, inputs), expected) and same_atoms(atoms_of(model), reference)
    _, peft_model = twins()  # a PeftModel: one more adapter beside its "default"
    load_adapter(peft_model, tmp_path / "ours", "ours")
    assert peft_model.active_adapter == "ours" and _close(run(peft_model, inputs), expected)
    assert same_atoms(atoms_of(peft_model), reference, "ours") and "default" in peft_model.peft_config

    save_adapter(peft_model, tmp_path / "back", "ours", format="atomtune")
    back = AtomModel.load(pixart(), tmp_path / "back")
    assert same_atoms(back, reference) and _close(run(back.model, inputs), expected)
    meta = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted(meta["modules"]) == sorted(reference.atoms())
    assert meta["config"]["num_atoms"] == 5 and meta["config"]["mode"] == "linear"

    save_adapter(model, tmp_path / "peft")  # and PEFT's own folder of the same adapter
    assert _close(run(PeftModel.from_pretrained(pixart(), tmp_path / "peft"), inputs), expected)


def test_folders_refuse_what_the_peft_path_cannot_hold(tmp_path):
    AtomModel(pixart(), AtomConfig(num_atoms=4)).save(tmp_path / "attention")
    with pytest.raises(AtomtuneError, match="mode='linear'") as caught:
        load_adapter(pixart(), tmp_path / "attention")
    assert "\n" not in str(caught.value)
    reference = AtomModel(tiny_sd3(), atom_config(["attn.to_q"]))
    reference.save(tmp_path / "sd3")
    with pytest.raises(AtomtuneError, match=r"trained on .*SD3Transformer2DModel"):
        load_adapter(pixart(), tmp_path / "sd3")
    with pytest.raises(AtomtuneError, match="format must be"):
        save_adapter(reference.model, tmp_path / "x", format="lora")


@pytest.mark.parametrize("host", ["pixart", "sd3"])
def test_diffusers_add_adapter_round_trip(host, tmp_path):
    """The DreamBooth scripts' route: ``transformer.add_adapter(config)``, train, save; a fresh
    transformer loads it, through ``load_adapter`` or ``PeftModel.from_pretrained``. diffusers 0.42's
    ``PixArtTransformer2DModel`` has no ``PeftAdapterMixin``, so there ``add_adapter``'s own call,
    ``inject_adapter_in_model``, stands in for it (PixArt's LoRA scripts use ``get_peft_model``)."""
    build, inputs, targets = {
        "pixart": (pixart, pixart_inputs(), TARGETS),
        "sd3": (tiny_sd3, sd3_inputs(), SD3_TARGETS),
    }[host]
    reference = AtomModel(build(), atom_config(targets))
    transformer = build()
    transformer.requires_grad_(False)
    if hasattr(transformer, "add_adapter"):
        transformer.add_adapter(peft_config(targets))
    else:
        assert inject_adapter_in_model(peft_config(targets), transformer) is transformer
    view = atoms_of(transformer)
    assert sorted(view.atoms()) == sorted(reference.atoms())  # the script's targets, the same modules
    assert view.num_trainable_parameters() == reference.num_trainable_parameters()
    move_every_tensor(reference, seed=11)
    copy_atoms(reference, view)
    expected = run(reference.model, inputs)
    assert _close(run(transformer, inputs), expected)
    with view.disable():
        assert _close(run(transformer, inputs), run(build(), inputs))
    assert _close(run(transformer, inputs), expected)
    if host == "sd3":  # diffusers' own switches
        transformer.disable_adapters()
        assert _close(run(transformer, inputs), run(build(), inputs))
        transformer.enable_adapters()
        assert transformer.active_adapters() == ["default"]

    save_adapter(transformer, tmp_path)
    fresh = build()
    load_adapter(fresh, tmp_path)
    assert atoms_of(fresh).active_adapter == "default" and same_atoms(atoms_of(fresh), reference)
    assert torch.equal(run(fresh, inputs), run(transformer, inputs))
    assert torch.equal(run(PeftModel.from_pretrained(build(), tmp_path), inputs), run(transformer, inputs))


@pytest.mark.parametrize("how", ["sum", "concat"])
def test_merging_two_adapters_as_atom_model_does(how):
    reference, peft_model = twins()
    move_every_tensor(reference, seed=1)
    copy_atoms(reference, atoms_of(peft_model))
    reference.add_adapter("style", atom_config())
    peft_model.add_adapter("style", peft_config())
    peft_model.set_adapter("style")
    move_every_tensor(reference, seed=2)
    copy_atoms(reference, atoms_of(peft_model), "style")
    for handle in (reference, atoms_of(peft_model)):
        handle.merge("default", "style", "both", how)
    assert peft_model.active_adapter == "both" and same_atoms(reference, atoms_of(peft_model))
    assert _close(run(peft_model, pixart_inputs()), run(reference.model, pixart_inputs()))
