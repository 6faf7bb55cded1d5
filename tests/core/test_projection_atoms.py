"""Atoms on the projections LoRA adapts (PixArt's ``to_q, to_k, to_v, to_out.0``), each with its own
dictionary: the whole transformer against a float64 naive reference, identity at step 0, masks,
gains, prune, save/load and both merges, with names that say which projection an atom lives in."""

from __future__ import annotations

import copy

import pytest
import torch

from atomtune import AtomConfig, AtomModel, AtomtuneError
from atomtune.core.parity import lora_parameters, parity_atoms
from atomtune.core.selection import top_k_masks
from atomtune.core.stats import AtomStatistics
from atomtune.core.targets import has_part
from atomtune.tiny import tiny_pixart, tiny_pixart_inputs
from conftest import run_pixart

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _config(**changes) -> AtomConfig:
    return AtomConfig(
        **{"mode": "linear", "target_modules": TARGETS, "num_atoms": 6, "lambda_init": 0.1, **changes}
    )


def _trained_looking(atoms: AtomModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in atoms.atoms().values():
            a.D.copy_(torch.randn(a.D.shape, generator=g, dtype=torch.float64).to(a.D.dtype) * 0.3)
            a.lam.copy_(torch.rand(a.lam.shape, generator=g, dtype=torch.float64).to(a.lam.dtype) * 0.3)


def _double(value):
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _naive_reference(base, atoms: AtomModel, adapter: str = "default"):
    """A copy of the base model whose every adapted projection adds, atom by atom and in float64,
    ``Σ_m gain_m·mask_m·soft(x·w_m, |λ_m|)·d_m`` after its own output: the formula, written out."""
    twin = copy.deepcopy(base)
    modules = dict(twin.named_modules())
    for name, a in atoms.atoms(adapter).items():
        W, D, lam = a.W_s.detach().double(), a.D.detach().double(), a.lam.detach().double().abs()
        steer = (a.mask * a.gain).double()

        def hook(_module, args, out, W=W, D=D, lam=lam, steer=steer):
            x = args[0].double()
            delta = torch.zeros(*x.shape[:-1], D.shape[1], dtype=torch.float64)
            for m in range(D.shape[0]):
                z = x @ W[:, m]
                s = torch.sign(z) * torch.clamp(z.abs() - lam[m], min=0)
                delta = delta + steer[m] * s[..., None] * D[m]
            return out + delta.to(out.dtype)

        modules[name].register_forward_hook(hook)
    return twin


def test_every_projection_lora_adapts_gets_its_own_dictionary():
    model = tiny_pixart(seed=0)
    atoms = AtomModel(model, _config())
    names = list(atoms.atoms())
    assert names[:4] == [f"transformer_blocks.0.attn1.{t}" for t in TARGETS]
    assert len(names) == 2 * 2 * 4  # two blocks, self- and cross-attention, four projections
    assert all(a.num_atoms == 6 for a in atoms.atoms().values())


def test_projection_atoms_equal_the_formula_in_float64():
    base = tiny_pixart(seed=0).double()
    inputs = _double(tiny_pixart_inputs(batch=2, seed=1))
    model = copy.deepcopy(base)
    atoms = AtomModel(model, _config())
    assert torch.equal(run_pixart(model, inputs), run_pixart(base, inputs))  # D = 0: identity at step 0
    _trained_looking(atoms, seed=3)
    name = "transformer_blocks.1.attn2.to_k"
    atoms.set_masks({name: torch.tensor([1.0, 0, 1, 1, 1, 1])})
    atoms.set_gains({"transformer_blocks.0.attn1.to_out.0": {4: 2.5}})
    out = run_pixart(model, inputs)
    reference = run_pixart(_naive_reference(base, atoms), inputs)
    assert (out - run_pixart(base, inputs)).abs().max() > 1e-3  # the atoms act
    assert torch.allclose(out, reference, rtol=0, atol=1e-10)


def test_mask_prune_save_load_keep_the_output_and_name_the_atoms(tmp_path):
    inputs = tiny_pixart_inputs(batch=2, seed=1)
    model = tiny_pixart(seed=0)
    atoms = AtomModel(model, _config())
    _trained_looking(atoms, seed=4)
    with torch.no_grad(), AtomStatistics(atoms) as stats:
        model(**inputs)
    masks = top_k_masks(stats.contribution(), 2)
    atoms.set_masks(masks)
    masked = run_pixart(model, inputs)
    twin = copy.deepcopy(model)  # masking equals dropping the rows of D
    for n, m in twin.named_modules():
        if hasattr(m, "atoms") and n in masks:
            a = m.atoms.adapters["default"]
            with torch.no_grad():
                a.mask.fill_(1)
                a.D[masks[n] == 0] = 0
    assert torch.allclose(run_pixart(twin, inputs), masked, atol=1e-6)
    sizes = atoms.prune()
    assert set(sizes.values()) == {2}  # a projection has no heads: pruned to exactly the kept atoms
    assert torch.allclose(run_pixart(model, inputs), masked, atol=1e-6)
    for n, a in atoms.atoms().items():
        assert a.atom_ids.tolist() == masks[n].nonzero().flatten().tolist()  # original ids kept
    atoms.save(tmp_path / "pruned")
    fresh = tiny_pixart(seed=0)
    AtomModel.load(fresh, tmp_path / "pruned")
    assert torch.equal(run_pixart(fresh, inputs), run_pixart(model, inputs))


def test_merges_of_projection_adapters_are_exact_per_projection():
    model = tiny_pixart(seed=0)
    atoms = AtomModel(model, _config(), adapter_name="concept")
    _trained_looking(atoms, seed=1)
    atoms.add_adapter("style", _config())
    _trained_looking(atoms, seed=2)
    atoms.merge("concept", "style", "both", how="concat")
    atoms.merge("concept", "style", "summed", how="sum")
    proj = model.transformer_blocks[0].attn2.to_v
    x = torch.randn(2, 5, proj.in_features)
    outs = {}
    for name in ("concept", "style", "both"):
        atoms.set_adapter(name)
        with torch.no_grad():
            outs[name] = proj(x)
    with atoms.disable(), torch.no_grad():
        bare = proj(x)
    assert torch.allclose(outs["both"], outs["concept"] + outs["style"] - bare, atol=1e-6)  # concat: exact
    key = "transformer_blocks.0.attn2.to_v"
    assert atoms.atoms("both")[key].num_atoms == 12
    a, b, s = (atoms.atoms(n)[key] for n in ("concept", "style", "summed"))
    assert torch.equal(s.W_s, a.W_s + b.W_s) and torch.equal(s.D, a.D + b.D)


@pytest.mark.parametrize("how", ["sum", "concat"])
def test_first_only_modules_keep_the_first_adapter_alone(how):
    model = tiny_pixart(seed=0)
    atoms = AtomModel(model, _config(), adapter_name="concept")
    _trained_looking(atoms, seed=1)
    atoms.add_adapter("style", _config())
    _trained_looking(atoms, seed=2)
    atoms.merge("concept", "style", "plain", how=how)
    atoms.merge("concept", "style", "kept", how=how, first_only=["attn1.to_q"])
    block = model.transformer_blocks[0]
    x = torch.randn(2, 5, block.attn1.to_q.in_features)
    outs = {}
    for name in ("concept", "plain", "kept"):
        atoms.set_adapter(name)
        with torch.no_grad():
            outs[name] = {p: getattr(block.attn1, p)(x) for p in ("to_q", "to_k")}
            outs[name]["cross_q"] = block.attn2.to_q(x)
    assert torch.equal(outs["kept"]["to_q"], outs["concept"]["to_q"])  # the style left out there
    assert not torch.allclose(outs["plain"]["to_q"], outs["concept"]["to_q"])
    for other in ("to_k", "cross_q"):  # the part names self-attention's queries only
        assert torch.equal(outs["kept"][other], outs["plain"][other])
    with pytest.raises(AtomtuneError, match=r"no adapted module has 'attn9\.to_q' in its name"):
        atoms.merge("concept", "style", "bad", how=how, first_only=["attn9.to_q"])
    assert "bad" not in atoms.configs
    atoms.merge("concept", "style", "self", how=how, first_only=["attn1"])  # all of self-attention
    atoms.set_adapter("self")
    with torch.no_grad():
        assert torch.equal(block.attn1.to_k(x), outs["concept"]["to_k"])
        assert torch.equal(block.attn2.to_q(x), outs["plain"]["cross_q"])


def test_a_part_is_a_run_of_dotted_components():
    name = "transformer_blocks.3.attn1.to_q"
    for part in ("attn1", "to_q", "attn1.to_q", "transformer_blocks.3", name):
        assert has_part(name, [part])
    for part in ("attn", "to", "3.attn", "to_q.x", "attn2"):
        assert not has_part(name, [part])


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_parity_on_the_projections_never_exceeds_lora(rank):
    model = tiny_pixart(seed=0)
    config = _config(num_atoms=1)
    count = parity_atoms(model, config, TARGETS, rank)
    lora = lora_parameters(model, TARGETS, rank)
    per_atom = sum(
        m.in_features + m.out_features + 1
        for n, m in model.named_modules()
        if n.endswith(tuple(TARGETS)) and isinstance(m, torch.nn.Linear)
    )
    assert lora < (count + 1) * per_atom  # the most atoms that fit ...
    assert count * per_atom <= lora or count == 1  # ... within LoRA's parameters (but at least one)
    assert count == max(1, rank - 1)  # one threshold per atom: a rank of LoRA buys just under one atom
