"""The streaming collector equals a direct computation, over any number of passes."""

from __future__ import annotations

import json

import torch

from atomtune import AtomConfig, AtomModel
from atomtune.core.losses import orthogonality
from atomtune.core.stats import AtomStatistics
from atomtune.tiny import tiny_pixart, tiny_pixart_inputs
from conftest import randomize_atoms


def test_collector_matches_direct_computation(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.Linear(6, 3))
    atoms = AtomModel(model, AtomConfig(mode="linear", target_modules="^0$", num_atoms=5, lambda_init=0.4))
    randomize_atoms(atoms)
    a = atoms.atoms()["0"]
    batches = [torch.randn(4, 7, 6), torch.randn(2, 3, 6), torch.randn(9, 6)]
    with torch.no_grad(), AtomStatistics(atoms) as stats:
        for x in batches:
            model(x)
    model(torch.randn(3, 6))  # outside the block: not counted
    with torch.no_grad():
        z = torch.cat([x.reshape(-1, 6) for x in batches]) @ a.W_s
        s = torch.sign(z) * torch.clamp(z.abs() - 0.4, min=0)
    assert stats.tokens["0"] == 28 + 6 + 9
    assert torch.allclose(stats.mean_abs()["0"], s.abs().mean(0).double(), atol=1e-6)
    assert torch.allclose(stats.frequency()["0"], (s != 0).double().mean(0))
    assert torch.allclose(stats.contribution()["0"], (s.abs().mean(0) * a.D.norm(dim=1)).double(), atol=1e-6)
    report = stats.report()["0"]
    assert report["contribution"] == sorted(report["contribution"], reverse=True)
    assert sorted(report["atom_ids"]) == list(range(5))
    stats.save_json(tmp_path / "atoms.json")
    assert json.loads((tmp_path / "atoms.json").read_text())["0"]["tokens"] == 43


def test_streaming_equals_one_big_batch():
    """Statistics over two passes equal those over the concatenated batch (items are independent)."""
    model = tiny_pixart()
    atoms = AtomModel(model, AtomConfig(num_atoms=8, lambda_init=0.1))
    first, second = tiny_pixart_inputs(batch=2, seed=3), tiny_pixart_inputs(batch=2, seed=4)
    both = {k: (torch.cat([v, second[k]]) if torch.is_tensor(v) else v) for k, v in first.items()}
    with torch.no_grad(), AtomStatistics(atoms) as split:
        model(**first)
        model(**second)
    with torch.no_grad(), AtomStatistics(atoms) as whole:
        model(**both)
    for name in whole.tokens:
        assert split.tokens[name] == whole.tokens[name]
        assert torch.allclose(split.mean_abs()[name], whole.mean_abs()[name], atol=1e-6)
        assert torch.equal(split.frequency()[name], whole.frequency()[name])
    assert all(not layer.listeners for layer in atoms.layers().values())


def test_orthogonality_penalty():
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert orthogonality(q[:5] * 3.0) < 1e-10  # scale does not matter: atoms are normalised
    d = torch.randn(4, 8)
    d_hat = d / d.norm(dim=1, keepdim=True)
    gram = d_hat @ d_hat.T
    naive = sum(gram[i, j] ** 2 for i in range(4) for j in range(4) if i != j) / 12
    assert torch.allclose(orthogonality(d), naive, atol=1e-6)
    assert orthogonality(torch.zeros(3, 4)) == 0  # D = 0 at initialisation: no NaN


def test_regularization_terms_follow_the_last_forward():
    model = tiny_pixart()
    atoms = AtomModel(model, AtomConfig(num_atoms=8, sparsity_weight=2.0, orthogonality_weight=0.0))
    model(**tiny_pixart_inputs())
    loss = atoms.regularization_loss()
    assert loss > 0 and loss.requires_grad
    # consumed: a second call without a forward has no sparsity term
    assert atoms.regularization_terms()["l1"] == 0
