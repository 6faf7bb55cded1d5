"""The atom budget: its schedule, its cuts against direct computations, true-sparsity metrics against
direct counts, the pruned sum merge as an exact union, and a toy task whose change lives in a few
atoms, found by the contribution ranking and missed by the random control."""

from __future__ import annotations

import pytest
import torch

from atomtune import AtomConfig, AtomModel
from atomtune.core.budget import AtomBudgetRun, budget_schedule, cut, kept_at, lr_factor
from atomtune.core.stats import AtomStatistics
from atomtune.errors import AtomtuneError
from atomtune.tiny import tiny_pixart, tiny_pixart_inputs
from conftest import randomize_atoms


def test_schedule_is_geometric_and_ends_at_the_budget():
    config = AtomConfig(num_atoms=64, atom_budget=4, prune_at=[0.25, 0.5])
    assert budget_schedule(config, 100) == [(25, 16), (50, 4)]  # 64·(1/16)^(1/2) = 16, then 4
    assert [kept_at(budget_schedule(config, 100), s, 64) for s in (24, 25, 49, 50, 100)] == [64, 16, 16, 4, 4]
    assert lr_factor(AtomConfig(num_atoms=64, lr_exponent=0.5), 16) == pytest.approx(2.0)
    assert budget_schedule(AtomConfig(num_atoms=8), 100) == []
    assert budget_schedule(AtomConfig(num_atoms=8, atom_budget=8), 100) == []
    for bad in ({"atom_budget": 0}, {"prune_at": [0.5, 0.25]}, {"prune_at": [1.5]}, {"lr_exponent": -1}):
        with pytest.raises(AtomtuneError):
            AtomConfig(**bad)


def test_cut_keeps_the_largest_live_atoms_and_random_keeps_as_many():
    model = tiny_pixart()
    atoms = AtomModel(model, AtomConfig(num_atoms=8))
    names = list(atoms.atoms())
    g = torch.Generator().manual_seed(0)
    importance = {n: torch.rand(8, generator=g, dtype=torch.float64) for n in names}
    first = names[0]
    atoms.atoms()[first].mask[importance[first].argmax()] = 0  # already cut: must stay cut
    assert set(cut(atoms, importance, 3).values()) == {3}
    for name in names:
        order = importance[name].argsort(descending=True).tolist()
        if name == first:
            order = order[1:]
        assert sorted(atoms.atoms()[name].mask.nonzero().flatten().tolist()) == sorted(order[:3])
    cut(atoms, importance, 1, by="random", generator=torch.Generator().manual_seed(1))
    assert all(int(a.mask.sum()) == 1 for a in atoms.atoms().values())


def test_cuts_that_fall_on_one_step_all_apply_and_raise_the_rate():
    model = tiny_pixart()
    atoms = AtomModel(model, AtomConfig(num_atoms=8, atom_budget=2, lr_exponent=0.5))
    run = AtomBudgetRun.start(atoms, total_steps=2, seed=0)
    assert run.schedule == [(1, 4), (1, 2)]  # a run shorter than the schedule
    with torch.no_grad():
        model(**tiny_pixart_inputs())  # the window sees one forward
    assert run.after_step(1) == pytest.approx(2.0)  # (8 / 2) ** 0.5
    assert {int(a.mask.sum()) for a in atoms.atoms().values()} == {2}
    assert run.after_step(2) is None
    run.finish()
    assert all(a.num_atoms <= 2 * 2 for a in atoms.atoms().values())  # pruned (2 heads: pads allowed)
    assert {int((a.atom_ids >= 0).sum()) for a in atoms.atoms().values()} == {2}


def test_true_sparsity_metrics_match_direct_counts():
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.Linear(6, 3))
    atoms = AtomModel(model, AtomConfig(mode="linear", target_modules="^0$", num_atoms=5, lambda_init=0.4))
    randomize_atoms(atoms)
    a = atoms.atoms()["0"]
    a.mask[4] = 0  # cut atom: not live, not counted
    x = torch.randn(40, 6)
    with torch.no_grad(), AtomStatistics(atoms) as stats:
        model(x)
    with torch.no_grad():
        z = x @ a.W_s
        s = (torch.sign(z) * torch.clamp(z.abs() - 0.4, min=0))[:, :4]
    report = stats.sparsity(share=0.9)["modules"]["0"]
    assert report["live_atoms"] == 4
    assert report["zero_share"] == pytest.approx((s == 0).double().mean().item())
    assert report["active_per_token"] == pytest.approx((s != 0).double().sum(1).mean().item())
    contribution = (s.abs().mean(0) * a.D[:4].norm(dim=1)).sort(descending=True).values
    expected = int((contribution.cumsum(0) < 0.9 * contribution.sum() * (1 - 1e-12)).sum()) + 1
    assert report["atoms_for_share"] == expected
    # the same two numbers from the training forward
    model(x).sum().backward()
    activity = atoms.activity()
    assert activity["zero_share"] == pytest.approx(report["zero_share"])
    assert activity["active_per_token"] == pytest.approx(report["active_per_token"])


def test_sum_merge_of_pruned_adapters_with_disjoint_atoms_is_their_exact_union():
    model = tiny_pixart(seed=0)
    inputs = tiny_pixart_inputs()
    atoms = AtomModel(model, AtomConfig(num_atoms=8, lambda_init=0.05), adapter_name="a")
    randomize_atoms(atoms, seed=1)
    atoms.add_adapter("b", AtomConfig(num_atoms=8, lambda_init=0.05))
    randomize_atoms(atoms, seed=2)
    keep_a = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0.0])  # the tiny model has 2 heads: 4 atoms each
    keep_b = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0.0])
    for name, keep in (("a", keep_a), ("b", keep_b)):
        atoms.set_masks({m: keep for m in atoms.atoms(name)}, adapter=name)
        atoms.prune(name)
    outs = {}
    for name in ("a", "b"):
        atoms.set_adapter(name)
        with torch.no_grad():
            outs[name] = model(**inputs).sample
    with atoms.disable(), torch.no_grad():
        bare = model(**inputs).sample
    atoms.merge("a", "b", "ab", how="sum")
    with torch.no_grad():
        merged = model(**inputs).sample
    # the modules' updates add; through the layers that follow, only to first order, so compare one module
    first = next(iter(atoms.atoms("ab")))
    assert sorted(i for i in atoms.atoms("ab")[first].atom_ids.tolist() if i >= 0) == [0, 1, 3, 4, 5, 6]
    assert (merged - bare).abs().max() > 1e-3
    one = AtomModel(
        tiny_pixart(seed=0), AtomConfig(num_atoms=8, lambda_init=0.05, layers=[0], attention="self")
    )
    attn = one.model.transformer_blocks[0].attn1
    x = torch.randn(2, 16, attn.to_q.in_features)
    src = {n: atoms.atoms(n)["transformer_blocks.0.attn1"] for n in ("a", "b", "ab")}
    results = {}
    for name, source in src.items():
        one.delete_adapter("default") if "default" in one.configs else None
        one.add_adapter(
            "default",
            one_config := AtomConfig(num_atoms=8, lambda_init=0.05, layers=[0], attention="self"),
            num_atoms={"transformer_blocks.0.attn1": source.num_atoms},
        )
        del one_config
        target = one.atoms()["transformer_blocks.0.attn1"]
        with torch.no_grad():
            for key in ("W_s", "D", "lam", "mask", "gain", "atom_ids"):
                getattr(target, key).copy_(getattr(source, key))
            results[name] = attn(x)
    with one.disable(), torch.no_grad():
        base = attn(x)
    assert torch.allclose(results["ab"], results["a"] + results["b"] - base, atol=1e-5)


def test_the_contribution_ranking_keeps_more_of_a_learned_change_than_chance():
    """Linear mode on a toy regression (a rank-2 change): train 16 atoms and cut to 4 after the last
    step, with no training after the cut. The 4 kept by contribution hold more of the change than
    any of 5 random draws of 4."""
    torch.manual_seed(0)
    width, steps = 16, 200
    base = torch.nn.Linear(width, width)
    x = torch.randn(512, width)
    with torch.no_grad():
        target = base(x) + (x @ torch.randn(width, 2)) @ torch.randn(2, width)

    def run(by: str, seed: int = 0) -> float:
        model = torch.nn.Sequential(torch.nn.Linear(width, width))
        model.load_state_dict({"0." + k: v for k, v in base.state_dict().items()})
        config = AtomConfig(
            mode="linear", target_modules="^0$", num_atoms=16, atom_budget=4, prune_at=[1.0],
            lambda_init=0.0, orthogonality_weight=0.0, sparsity_weight=0.0, prune_by=by,
        )  # fmt: skip
        torch.manual_seed(1)
        handle = AtomModel(model, config)
        budget = AtomBudgetRun.start(handle, steps, seed=seed)
        optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=1e-2)
        for step in range(1, steps + 1):
            loss = (model(x) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            budget.after_step(step)
        budget.finish()
        assert handle.atoms()["0"].num_atoms == 4  # pruned to its real size
        with torch.no_grad():
            return (model(x) - target).pow(2).mean().item() / (base(x) - target).pow(2).mean().item()

    kept, random = run("contribution"), [run("random", seed) for seed in range(5)]
    print(kept, random)
    assert kept < min(random), (kept, random)
