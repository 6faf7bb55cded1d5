"""Injection leaves the pretrained outputs unchanged; training changes them; gradients reach every part."""

from __future__ import annotations

import pytest
import torch

from atomtune import AtomConfig, AtomModel, AtomtuneError
from atomtune.tiny import tiny_causal_lm, tiny_pixart
from conftest import run_pixart


def _train_step(atom_model, loss_fn, lr=1e-2):
    opt = torch.optim.SGD(atom_model.trainable_parameters(), lr=lr)
    loss = loss_fn() + atom_model.regularization_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize(
    "config",
    [
        AtomConfig(num_atoms=8),
        AtomConfig(num_atoms=8, placement="post_out"),
        AtomConfig(num_atoms=8, attention="self", fused=False),
        AtomConfig(num_atoms=8, attention="cross", shrinkage="relu"),
        AtomConfig(num_atoms=8, shrinkage="topk", topk=2, layers=[1]),
    ],
    ids=["pre_out", "post_out", "self-separate", "cross-relu", "topk-layer1"],
)
def test_pixart_identity_then_training_changes_output(pixart, pixart_inputs, config):
    before = run_pixart(pixart, pixart_inputs)
    atoms = AtomModel(pixart, config)
    after = run_pixart(pixart, pixart_inputs)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    _train_step(atoms, lambda: pixart(**pixart_inputs).sample.pow(2).mean())
    assert (run_pixart(pixart, pixart_inputs) - before).abs().max() > 1e-5


def test_module_selection(pixart):
    names = lambda cfg: sorted(AtomModel(tiny_pixart(), cfg).layers())  # noqa: E731
    assert names(AtomConfig(num_atoms=2, attention="self")) == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]
    assert names(AtomConfig(num_atoms=2, attention="cross", layers=[1])) == ["transformer_blocks.1.attn2"]
    assert names(AtomConfig(num_atoms=2, target_modules=r"blocks\.0\.")) == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.0.attn2",
    ]
    with pytest.raises(AtomtuneError, match="no module"):
        AtomModel(pixart, AtomConfig(num_atoms=2, target_modules="nothing-like-this"))
    with pytest.raises(AtomtuneError, match="multiple of the 2 attention heads"):
        AtomModel(tiny_pixart(), AtomConfig(num_atoms=3))


def test_base_frozen_and_gradients_reach_ws_d_lambda(pixart, pixart_inputs):
    atoms = AtomModel(pixart, AtomConfig(num_atoms=8))
    trainable = {n for n, p in pixart.named_parameters() if p.requires_grad}
    assert trainable and all(".atoms.adapters.default." in n for n in trainable)
    loss_fn = lambda: pixart(**pixart_inputs).sample.pow(2).mean()  # noqa: E731
    _train_step(atoms, loss_fn)  # D leaves zero, as LoRA's B does
    loss = loss_fn() + atoms.regularization_loss()
    loss.backward()
    for name, a in atoms.atoms().items():
        for pname in ("W_s", "D", "lam"):
            grad = getattr(a, pname).grad
            assert grad is not None and grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


def test_fixed_lambda_is_not_trained(pixart):
    atoms = AtomModel(pixart, AtomConfig(num_atoms=4, learn_lambda=False))
    assert all(not a.lam.requires_grad for a in atoms.atoms().values())
    assert all(a.W_s.requires_grad for a in atoms.atoms().values())


@pytest.mark.parametrize(
    "kind,target,count", [("llama", r"mlp\.(gate|up|down)_proj", 6), ("gpt2", r"mlp\.c_(fc|proj)", 4)]
)
def test_causal_lm_linear_mode(kind, target, count):
    model = tiny_causal_lm(kind)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    atoms = AtomModel(model, AtomConfig(mode="linear", target_modules=target, num_atoms=6))
    assert len(atoms.layers()) == count
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6, rtol=0)
    loss_fn = lambda: model(ids, labels=ids).loss  # noqa: E731
    _train_step(atoms, loss_fn, lr=0.5)
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() > 1e-5
    loss_fn().backward()
    for a in atoms.atoms().values():
        assert a.W_s.grad.abs().sum() > 0 and a.D.grad.abs().sum() > 0 and a.lam.grad.abs().sum() > 0


def test_linear_mode_equals_formula():
    """ΔY = σ_λ(X·W_s)·D added to the layer, computed by hand."""
    layer = torch.nn.Sequential(torch.nn.Linear(5, 7))
    atoms = AtomModel(layer, AtomConfig(mode="linear", target_modules="0", num_atoms=4, lambda_init=0.3))
    a = atoms.atoms()["0"]
    with torch.no_grad():
        a.D.copy_(torch.randn(4, 7))
    x = torch.randn(3, 2, 5)
    z = x @ a.W_s
    s = torch.sign(z) * torch.clamp(z.abs() - 0.3, min=0)
    expected = layer[0].weight @ x.unsqueeze(-1)
    expected = expected.squeeze(-1) + layer[0].bias + s @ a.D
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_disable_and_unload_restore_the_base(pixart, pixart_inputs):
    before = run_pixart(pixart, pixart_inputs)
    requires = {n: p.requires_grad for n, p in pixart.named_parameters()}
    atoms = AtomModel(pixart, AtomConfig(num_atoms=8))
    from conftest import randomize_atoms

    randomize_atoms(atoms)
    adapted = run_pixart(pixart, pixart_inputs)
    assert (adapted - before).abs().max() > 1e-3
    with atoms.disable():
        assert torch.equal(run_pixart(pixart, pixart_inputs), before)
    assert torch.equal(run_pixart(pixart, pixart_inputs), adapted)
    base = atoms.unload()
    assert base is pixart
    assert torch.equal(run_pixart(pixart, pixart_inputs), before)
    assert not any(".atoms." in n for n, _ in pixart.named_parameters())
    assert {n: p.requires_grad for n, p in pixart.named_parameters()} == requires


def test_named_adapters_one_active(pixart, pixart_inputs):
    from conftest import randomize_atoms

    atoms = AtomModel(pixart, AtomConfig(num_atoms=4), adapter_name="a")
    randomize_atoms(atoms, seed=1)
    out_a = run_pixart(pixart, pixart_inputs)
    atoms.add_adapter("b", AtomConfig(num_atoms=8, attention="self"))
    assert atoms.active_adapter == "b"
    randomize_atoms(atoms, seed=2)
    out_b = run_pixart(pixart, pixart_inputs)
    assert not torch.allclose(out_a, out_b)
    # only the active adapter trains
    assert all(not p.requires_grad for p in atoms.atoms("a")["transformer_blocks.0.attn1"].parameters())
    atoms.set_adapter("a")
    assert torch.equal(run_pixart(pixart, pixart_inputs), out_a)
    with pytest.raises(AtomtuneError, match="no adapter named 'c'"):
        atoms.set_adapter("c")
    with pytest.raises(AtomtuneError, match="exists already"):
        atoms.add_adapter("a", AtomConfig(num_atoms=4))
    atoms.delete_adapter("b")
    assert "b" not in atoms.configs and torch.equal(run_pixart(pixart, pixart_inputs), out_a)
