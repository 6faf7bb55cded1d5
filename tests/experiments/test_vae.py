"""The VAE experiment (atomtune.experiments.vae): IDX files, identity at step 0, the claim in a fast setting."""

from __future__ import annotations

import copy
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from atomtune.cli import main
from atomtune.errors import AtomtuneError
from atomtune.experiments.digit_data import load_mnist_idx, load_sklearn_digits_28, read_idx
from atomtune.experiments.vae import (
    LORA_TARGETS,
    LoraStatistics,
    TransformerVAE,
    VaeSettings,
    add_atoms,
    add_lora,
    finetune_atoms,
    lora_component_removed,
    run_vae,
    train,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """The IDX encoding of ``array``, written independently of the reader."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(dtype).tobytes()


def write_mnist(folder, n=12, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images, labels


# ------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    images, labels = write_mnist(tmp_path / "mnist", gz=gz)
    x, y = load_mnist_idx(tmp_path / "mnist")
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
    assert y.tolist() == labels.tolist()


def test_idx_other_types_and_big_endian(tmp_path):
    values = np.arange(-6, 6, dtype=np.int16).reshape(3, 4) * 300
    (tmp_path / "a.idx").write_bytes(idx_bytes(values, 0x0B))
    assert read_idx(tmp_path / "a.idx").tolist() == values.tolist()
    floats = np.linspace(-1, 1, 5, dtype=np.float32)
    (tmp_path / "b.idx").write_bytes(idx_bytes(floats, 0x0D))
    assert np.array_equal(read_idx(tmp_path / "b.idx"), floats)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b[:-7], "truncated"),
        (lambda b: b + b"\x00", "longer than its header"),
        (lambda b: b"\x08\x03" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x42" + b[3:], "bad magic"),
        (lambda b: b[:9], "truncated header"),
        (lambda b: b"", "bad magic"),
    ],
)
def test_corrupt_idx_is_one_clear_error(tmp_path, corrupt, message):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(AtomtuneError, match=message) as info:
        load_mnist_idx(tmp_path)
    assert "\n" not in str(info.value)


def test_mnist_folder_problems_are_clear_errors(tmp_path):
    with pytest.raises(AtomtuneError, match="MNIST folder not found"):
        load_mnist_idx(tmp_path / "nowhere")
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(AtomtuneError, match="no train-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(AtomtuneError, match="labels for 12 images"):
        load_mnist_idx(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(AtomtuneError, match="not a readable gzip"):
        load_mnist_idx(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 8, 8), np.uint8)))
    with pytest.raises(AtomtuneError, match="not 28x28"):
        load_mnist_idx(tmp_path)


def test_cli_refuses_bad_mnist_input_in_one_line(tmp_path, capsys):
    write_mnist(tmp_path / "m")
    path = tmp_path / "m" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    out = tmp_path / "out"
    assert main(["experiment", "vae", "--data", "mnist-idx", str(tmp_path / "m"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atomtune: error:") and "truncated" in err and "\n" not in err
    assert not out.exists()  # refused before anything was written
    assert main(["experiment", "vae", "--data", "mnist-idx", "--out", str(out)]) == 2
    assert main(["experiment", "vae", "--data", "digits", "x", "--out", str(out)]) == 2
    assert main(["experiment", "vae", "--new-digit", "8", "--out", str(out)]) == 2
    assert main(["experiment", "vae", "--atom-budget", "-1", "--out", str(out)]) == 2
    assert main(["experiment", "vae", "--atom-budget", "8", "--out", str(out)]) == 2  # not below 8 atoms
    assert main(["experiment", "vae", "--form", "attention", "--num-atoms", "6", "--out", str(out)]) == 2
    assert main(["experiment", "vae", "--budget-lora-rank", "-2", "--out", str(out)]) == 2
    assert not out.exists()


def test_bundled_digits_are_centred_28x28():
    x, y = load_sklearn_digits_28()
    assert x.shape == (1797, 1, 28, 28) and len(y) == 1797
    assert x.min() >= 0 and x.max() <= 1
    assert x[..., :4, :].abs().max() == 0 and x[..., -4:].abs().max() == 0  # 4-pixel margins
    assert sorted(set(y.tolist())) == list(range(10))


# -------------------------------------------------------------------------------------- fine-tuning


def trained_looking_vae(seed=0):
    torch.manual_seed(seed)
    vae = TransformerVAE(VaeSettings())
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


@pytest.mark.parametrize("method", ["atoms", "atoms_budget", "atoms_attention", "lora"])
def test_fine_tuned_vae_equals_pretrained_at_step_0(method):
    s = (
        VaeSettings(form="attention", num_atoms=32, atom_budget=8)
        if method == "atoms_attention"
        else VaeSettings()
    )
    vae = trained_looking_vae()
    x = torch.rand(4, 1, 28, 28)
    z = torch.randn(4, s.latent)
    with torch.no_grad():
        ref_mu, _ = vae.encode(x)
        ref = vae.decode(z)
    tuned = copy.deepcopy(vae)
    if method.startswith("atoms"):
        handle = add_atoms(tuned, s, s.atom_budget if method == "atoms_budget" else None)
        # every projection LoRA adapts, or every encoder and decoder attention module
        assert len(handle.layers()) == (4 if s.form == "attention" else 16)
        params = handle.trainable_parameters()
    else:
        add_lora(tuned, s)
        params = [p for p in tuned.parameters() if p.requires_grad]
        assert sum("lora_B" in n for n, _ in tuned.named_parameters()) == 16  # q, k, v, out x 4 modules
    assert all(
        not p.requires_grad for n, p in tuned.named_parameters() if "atoms" not in n and "lora_" not in n
    )
    with torch.no_grad():
        mu, _ = tuned.encode(x)
        out = tuned.decode(z)
    assert torch.allclose(mu, ref_mu, atol=1e-5)
    assert torch.allclose(out, ref, atol=1e-5)
    # The adapter is live: a step of training moves the output.
    opt = torch.optim.SGD(params, lr=0.5)
    tuned.train()
    tuned.loss(x.round()).backward()
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(tuned.eval().decode(z), ref, atol=1e-4)


def test_budget_fine_tune_cuts_to_the_budget_and_prunes():
    """The core's recipe in the VAE: cuts during training, then an adapter of the budget's size."""
    s = VaeSettings(finetune_steps=8, batch_size=4, atom_budget=3)
    vae = trained_looking_vae()
    base = {k: v.clone() for k, v in vae.state_dict().items()}
    images = (torch.rand(16, 1, 28, 28) > 0.7).float()
    seen = []
    _, atoms, losses = finetune_atoms(vae, s, images, s.atom_budget, progress=False)
    assert len(losses) == 8
    for a in atoms.atoms().values():
        live = a.mask != 0
        seen.append(int(live.sum()))
        assert a.atom_ids[live].unique().numel() == int(live.sum())  # the kept atoms' original ids
        assert a.atom_ids[~live].eq(-1).all()  # spare slots (heads keep equal widths) are empty
        assert torch.all(a.D[~live] == 0)
    assert seen == [3] * 16  # q, k, v, out of four attention modules
    # Without a budget, nothing is cut.
    _, full, _ = finetune_atoms(vae, s.replace(finetune_steps=2), images, None, progress=False)
    assert all(int((a.mask != 0).sum()) == s.num_atoms for a in full.atoms().values())
    # The base model is untouched by either fine-tune (they work on copies).
    after = vae.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_train_applies_the_learning_rate_factor():
    s = VaeSettings(batch_size=2, lr=1e-2)
    w = torch.nn.Parameter(torch.zeros(3))
    images = torch.ones(4, 3)
    steps = []

    def after(step):
        steps.append(step)
        return 4.0 if step == 2 else None

    train(lambda x: (x * w).sum(), [w], images, s, 4, "t", progress=False, after_step=after)
    assert steps == [1, 2, 3, 4]
    # Adam moves each weight by about lr per step on a constant gradient: 2 steps at lr, 2 at 4·lr.
    assert torch.allclose(w, torch.full((3,), -(2 * 1e-2 + 2 * 4e-2)), rtol=1e-3)


def test_atoms_and_lora_have_the_same_budget():
    s = VaeSettings()
    atoms = add_atoms(copy.deepcopy(trained_looking_vae()), s).num_trainable_parameters()
    lora_vae = add_lora(copy.deepcopy(trained_looking_vae()), s)
    lora = sum(p.numel() for p in lora_vae.parameters() if p.requires_grad)
    assert atoms == 4 * 4 * s.num_atoms * (2 * s.width + 1)  # q, k, v, out of four modules
    assert lora == 4 * 4 * s.lora_rank * 2 * s.width
    assert abs(atoms - lora) / lora < 0.01


def test_lora_component_removal_is_exact_and_restored():
    s = VaeSettings()
    vae = add_lora(trained_looking_vae(), s)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    z = torch.randn(3, s.latent)
    stats = LoraStatistics(vae)
    names = stats.component_names("decoder.1.attn")
    assert len(names) == 4 * s.lora_rank and names[0] == "to_q/0"
    index = names.index("to_v/2")
    layer = dict(stats.components["decoder.1.attn"])["to_v"]
    before = layer.lora_B["default"].weight.clone()
    with torch.no_grad():
        full = vae.decode(z)
        with lora_component_removed(vae, "decoder.1.attn", index):
            removed = vae.decode(z)
            assert layer.lora_B["default"].weight[:, 2].abs().max() == 0
            assert torch.equal(layer.lora_B["default"].weight[:, 3], before[:, 3])
        # Reference: the same change made by hand on a copy of the weights.
        layer.lora_B["default"].weight[:, 2] = 0
        by_hand = vae.decode(z)
        layer.lora_B["default"].weight.copy_(before)
    assert torch.equal(layer.lora_B["default"].weight, before)
    assert torch.allclose(removed, by_hand) and not torch.allclose(removed, full)


# ------------------------------------------------------------------------------------ the claim, fast


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return out, run_vae(VaeSettings.fast(seed=0), out, progress=False)


def test_fine_tunes_make_the_new_digit(fast_run):
    _, r = fast_run
    before = r["pretrained"]["p_new"]
    # Both methods raise P(new digit) over the pretrained model, and the judge can tell digits apart.
    assert r["judge"]["held_out_accuracy"] > 0.8
    # Every fine-tune of the fast run lifts P(new) well above the pretrained model.
    for key in ("atoms", "atoms_budget", "lora", "lora_budget"):
        assert r[key]["p_new"] > before + 0.2, key
    assert r["pretrained"]["p_old"] > r["pretrained"]["p_new"]


def test_budget_fine_tune_keeps_its_budget(fast_run):
    """The dense-then-prune fine-tune ends with the budget's atoms per module, all of them counted."""
    _, r = fast_run
    m, budget = r["atoms_budget"], r["settings"]["atom_budget"]
    assert m["atom_budget"] == budget
    projections = [f"{p}.{i}.attn.{t}" for p in ("encoder", "decoder") for i in (0, 1) for t in LORA_TARGETS]
    assert m["live_atoms"] == dict.fromkeys(projections, budget)
    assert m["components_per_layer"] == m["live_atoms"]
    assert all(count <= budget for count in m["components_for_share"].values())
    assert m["live_parameters"] == 16 * budget * (2 * r["settings"]["width"] + 1)
    # LoRA at the pruned atoms' budget: rank 2 on four projections of four modules, within 1%.
    lora_small = r["lora_budget"]["trainable_parameters"]
    assert lora_small == 4 * 4 * r["settings"]["budget_lora_rank"] * 2 * r["settings"]["width"]
    assert abs(m["live_parameters"] - lora_small) / lora_small < 0.01


def test_measures_are_consistent(fast_run):
    _, r = fast_run
    for key in ("atoms", "atoms_budget", "lora", "lora_budget"):
        m = r[key]
        assert set(m["components_for_share"]) == {  # LoRA grouped as the atoms are: per projection
            f"{p}.{i}.attn.{t}" for p in ("encoder", "decoder") for i in (0, 1) for t in LORA_TARGETS
        }
        for name, count in m["components_for_share"].items():
            assert 0 <= count <= m["components_per_layer"][name]
            c = torch.tensor(m["contribution"][name], dtype=torch.float64)
            assert torch.all(c[:-1] >= c[1:])  # ranked
            if c.sum() == 0:  # a layer whose atoms all died carries nothing
                assert count == 0
                continue
            assert c[:count].sum() >= 0.9 * c.sum() * (1 - 1e-9) and c[: count - 1].sum() < 0.9 * c.sum()
        assert len(m["removal"]) >= 2
        for e in m["removal"]:
            assert 0 <= e["p_new"] <= 1 and e["pixel_change"] >= 0
    assert 0 <= r["atoms"]["zero_coefficient_share"] <= 1
    assert 0 <= r["atoms_budget"]["zero_coefficient_share"] <= 1


def test_files_are_written_atomically(fast_run):
    out, r = fast_run
    assert sorted(p.name for p in out.iterdir()) == ["vae.json", "vae.md", "vae.png"]
    assert (out / "vae.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "vae.json").read_text())
    assert data["atoms"]["p_new"] == r["atoms"]["p_new"]
    assert VaeSettings(**data["settings"]) == VaeSettings.fast(seed=0)
    md = (out / "vae.md").read_text()
    assert f"{r['atoms']['p_new']:.3f}" in md and f"{r['lora']['p_new']:.3f}" in md
