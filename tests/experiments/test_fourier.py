"""The paper's toy experiment (atomtune.experiments.fourier): the claim in a fast setting, the files, the measures."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from atomtune.core.shrinkage import shrink
from atomtune.experiments.fourier import (
    FourierBlock,
    FourierSettings,
    atoms_needed,
    make_signals,
    partial_sum_errors,
    positional_encoding,
    run_fourier,
    spectra,
    subspace_basis,
    subspace_references,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fourier")
    result = run_fourier(FourierSettings.fast(seed=0, layout="lifted"), out, progress=False)
    return out, result


def test_positions_layout_fast_setting_beats_the_linear_map(tmp_path):
    """The default layout (a token per sample, attention layers first) in its fast setting solves the task
    better than any fixed linear map, for both blocks, and the sparse block's codes are sparse.

    Measured (seed 0, 600 steps at width 64): masked NMSE dense 0.19, sparse 0.10, best linear map 0.31.
    The two blocks train side by side in two processes, as the command does.
    """
    r = run_fourier(FourierSettings.fast(seed=0), tmp_path, progress=False, processes=2)
    assert r["settings"]["layout"] == "positions"
    for kind in ("dense", "sparse"):
        assert r[kind]["masked_nmse"] < 0.8 * r["linear_nmse"], (
            kind,
            r[kind]["masked_nmse"],
            r["linear_nmse"],
        )
    assert r["references"]["oracle_nmse"] < 1e-6  # the task is solvable: 16 samples fix the 10 coefficients
    assert 1 <= r["sparse"]["atoms_needed_mean"] <= r["sparse"]["atoms_total"]
    assert r["sparse"]["nonzero_coefficients_fraction"] < 0.5 < r["dense"]["nonzero_coefficients_fraction"]


def test_two_processes_train_the_same_blocks(tmp_path):
    """Training the blocks side by side (one thread each) gives the blocks of training them in turn."""
    tiny = FourierSettings(seed=3, steps=15, train_signals=128, eval_signals=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = run_fourier(tiny, tmp_path / "a", progress=False, processes=1)
        b = run_fourier(tiny, tmp_path / "b", progress=False, processes=2)
    finally:
        torch.set_num_threads(threads)
    for kind in ("dense", "sparse"):
        assert a[kind]["masked_nmse"] == b[kind]["masked_nmse"]
        assert a[kind]["partial_sum_error_mean"] == b[kind]["partial_sum_error_mean"]
    assert b["environment"]["processes"] == 2


def test_sparse_block_needs_fewer_atoms_at_comparable_error(fast_run):
    _, r = fast_run
    dense, sparse = r["dense"], r["sparse"]
    # Both actually reconstruct the masked samples (predicting zero scores 1.0) ...
    assert dense["masked_nmse"] < 0.7
    assert sparse["masked_nmse"] < 0.7
    # ... at comparable error (measured here: 0.45 against 0.30; at the defaults 10-20% apart) ...
    assert sparse["masked_nmse"] < 2 * dense["masked_nmse"]
    # ... and the sparse block needs fewer of its atoms than the dense block needs of its W_v rows.
    # Measured: 1.85x here, 1.9-3.7x at the defaults (seeds 0-2): not the "several times" (100 against 9)
    # of the paper, so that is not asserted; see the module docstring.
    assert dense["atoms_needed_mean"] >= 1.5 * sparse["atoms_needed_mean"]
    assert r["ratio_atoms_needed"] == pytest.approx(dense["atoms_needed_mean"] / sparse["atoms_needed_mean"])
    # The sparse block's codes are sparse; the dense block's coefficients are not.
    assert sparse["nonzero_coefficients_fraction"] < 0.5
    assert dense["nonzero_coefficients_fraction"] > 0.9


def test_json_and_png_are_written_atomically(fast_run):
    out, r = fast_run
    assert sorted(p.name for p in out.iterdir()) == ["fourier.json", "fourier.png"]  # no temporary files left
    assert (out / "fourier.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "fourier.png").stat().st_size > 10_000
    data = json.loads((out / "fourier.json").read_text())
    for key in (
        "settings",
        "bases",
        "linear_nmse",
        "dense",
        "sparse",
        "ratio_atoms_needed",
        "example",
        "seconds",
    ):
        assert key in data
    for kind in ("dense", "sparse"):
        for key in (
            "masked_nmse",
            "atoms_needed_mean",
            "pca_atoms_needed_mean",
            "fourier_like_atoms",
            "train_seconds",
            "partial_sum_error_mean",
        ):
            assert key in data[kind], (kind, key)
    assert data["sparse"]["atoms_needed_mean"] == r["sparse"]["atoms_needed_mean"]
    assert FourierSettings(**data["settings"]) == FourierSettings.fast(seed=0, layout="lifted")
    assert len(data["bases"]) == 5 and all(0 <= f <= 24 for f in data["bases"])
    assert data["seconds"] > 0


@pytest.mark.parametrize("layout", ["positions", "lifted"])
def test_same_seed_same_result(tmp_path, layout):
    tiny = FourierSettings(seed=3, steps=15, train_signals=128, eval_signals=16, layout=layout)
    a = run_fourier(tiny, tmp_path / "a", progress=False)
    b = run_fourier(tiny, tmp_path / "b", progress=False)
    c = run_fourier(tiny.replace(seed=4), tmp_path / "c", progress=False)
    for kind in ("dense", "sparse"):
        assert a[kind]["masked_nmse"] == b[kind]["masked_nmse"]
        assert a[kind]["partial_sum_error_mean"] == b[kind]["partial_sum_error_mean"]
        assert a[kind]["masked_nmse"] != c[kind]["masked_nmse"]


def test_signals_follow_the_paper():
    s = FourierSettings()
    g = torch.Generator().manual_seed(0)
    bases = torch.tensor([2, 3, 7, 21, 24])
    x, mask = make_signals(s, 64, g, bases)
    assert x.shape == mask.shape == (64, 64)
    assert torch.all(mask.sum(1) == 16)
    energy = spectra(x)
    # All the energy sits at the shared frequencies, and every signal uses all of them.
    assert torch.allclose(energy[:, bases].sum(1), energy.sum(1), rtol=1e-4)
    assert torch.all(energy[:, bases] > 0.1)
    # Without shared bases, each signal has its own 5 frequencies (a constant one may nearly vanish).
    energy = spectra(make_signals(s, 64, g, None)[0])
    assert torch.all((energy > 0.1).sum(1) <= 5) and torch.all((energy[:, 1:] > 0.1).sum(1) >= 4)
    assert energy[:, 25:].max() < 1e-6
    assert len({tuple(row.nonzero().flatten().tolist()) for row in energy > 0.1}) > 32


def per_head_reference(q, k, V, heads):
    """``concat_h softmax(q_h·k_hᵀ/√d)·V_h`` in float64, head by head, V's channels split evenly."""
    q, k, V = q.double(), k.double(), V.double()
    width = V.shape[-1] // heads
    out = []
    for h in range(heads):
        A = torch.softmax(q[:, h] @ k[:, h].transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out.append(A @ V[..., h * width : (h + 1) * width])
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("layout", ["positions", "lifted"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_block_matches_the_explicit_attention_map(kind, layout, heads):
    s = FourierSettings(layout=layout, block_heads=heads)
    torch.manual_seed(1)
    block = FourierBlock(kind, s, torch.randn(s.lift_dim))
    with torch.no_grad():  # a trained-looking attention map, not the near-uniform one of the init
        block.W_q.normal_(0, 0.2)
        block.W_k.normal_(0, 0.2)
    x, mask = make_signals(s, 4, torch.Generator().manual_seed(2), None)
    with torch.no_grad():
        S = block.coefficients(x, mask)
        q, k, X = block.attention_inputs(x, mask)
        assert q.shape[1] == heads and X.shape[-1] == s.feature_dim
        if kind == "dense":
            ref = per_head_reference(q, k, X, heads)
        else:
            z = per_head_reference(q, k, X @ block.W_s, heads)
            ref = shrink(z, "soft", lam=block.lam.abs().double())
        y, _, _ = block(x, mask)
        contrib = block.contributions(S)
        # Naive output: the per-token output O = S·atoms, summed over the lifted dims (tokens, or features).
        naive = (S @ block.atoms).sum(1 if layout == "lifted" else -1)
    assert torch.allclose(S.double(), ref, atol=1e-5)
    # The output is exactly the sum of the atoms' contributions, and the block's naive output.
    assert torch.allclose(contrib.sum(1), y, atol=1e-4)
    assert torch.allclose(naive, y, atol=1e-4)


def test_positional_encoding_tells_positions_apart():
    pe = positional_encoding(64)
    assert pe.shape == (64, 63)
    gram = pe @ pe.T
    assert torch.allclose(gram.diagonal(), torch.full((64,), 32.0), atol=1e-3)
    off = gram - torch.diag(gram.diagonal())
    assert off.abs().max() < 1.01  # nearly orthogonal codes: no two positions look alike


def test_atoms_needed_definition():
    t = torch.arange(64.0)
    waves = torch.stack([torch.cos(2 * math.pi * f * t / 64) for f in (1, 2, 3, 4)])
    # Signal 0: one dominant atom (the rest under 5% together). Signal 1: three equal atoms.
    contrib = torch.stack(
        [
            waves * torch.tensor([1.0, 0.02, 0.02, 0.0])[:, None],
            waves * torch.tensor([1.0, 1.0, 1.0, 0.0])[:, None],
        ]
    )
    y = contrib.sum(1)
    err, order = partial_sum_errors(contrib, y)
    need = atoms_needed(err, 0.05)
    assert need.tolist() == [1, 3]
    assert order[0, 0] == 0
    assert err[:, -1].max() < 1e-6  # all atoms together are the output
    assert atoms_needed(err, 0.0001).tolist() == [3, 3]


def test_subspace_references_bound_the_task():
    """The references that know the frequencies: exact least squares, Landweber steps, their best mix."""
    s = FourierSettings(eval_signals=256)
    bases = torch.tensor([0, 1, 7, 21, 24])
    test = make_signals(s, s.eval_signals, torch.Generator().manual_seed(5), bases)
    phi = subspace_basis(bases, s.seq_len)
    assert phi.shape == (64, 9)  # frequency 0 has no sine
    assert torch.allclose(phi.T @ phi, torch.eye(9, dtype=torch.float64), atol=1e-10)
    x = test[0].double()
    assert torch.allclose(x @ phi @ phi.T, x, atol=1e-4)  # the signals (float32) lie in the subspace
    r = subspace_references(test, bases)
    assert r["oracle_nmse"] < 1e-8  # 16 observations pin 9 coefficients down
    landweber, polynomial = r["landweber_nmse"], r["polynomial_nmse"]
    assert len(landweber) == len(polynomial) == 4
    assert all(a > b for a, b in itertools.pairwise(landweber))  # each step lowers the error
    # k Landweber steps are one polynomial of degree k - 1 in G: the best one does at least as well.
    assert all(p <= w + 1e-9 for p, w in zip(polynomial, landweber, strict=True))
    assert 0.2 < landweber[0] < 0.5  # one step is about the linear map's error
