"""The edit benchmark: its knobs against naive references on PEFT models (rank truncation at full
rank is the adapter, rank r gives a rank-r update, scale 0 is the pretrained model, LoRA's scale
is PEFT's), random removal keeps top-k's count, the interpolation at matched identity, and a
reduced run end to end that resumes without training again; bad settings are one clear error
(the command line's exit code: tests/cli/test_edit_bench_cli.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from atomtune.diffusion.methods import MethodConfig
from atomtune.errors import AtomtuneError
from atomtune.testbed import edit_knobs as kn
from atomtune.testbed.edit_bench import EditBenchSettings, _Bench, run_edit_bench
from atomtune.testbed.edit_report import METRICS, _strength_lines, at_identity, strength
from atomtune.testbed.edit_sources import make_sources


class Attention(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, width) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(width, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](torch.tanh(self.to_q(x)) * self.to_k(x) + self.to_v(x))


def peft_model(method: str, rank: int = 4) -> nn.Module:
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(Attention(), Attention()).double()
    config = MethodConfig(method, rank=rank, oft_r=2).peft_config()
    inject_adapter_in_model(config, model)
    with torch.no_grad():  # a trained adapter: no factor left at its zero start
        for name, p in model.named_parameters():
            if "lora_" in name or "oft_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture
def x():
    return torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def unloaded(model: nn.Module) -> nn.Module:
    from atomtune.diffusion.peft_tuned import PeftTuned

    return PeftTuned(model, "lora", ["default"], None).unload()


def test_tuned_weights_of_lora_are_the_naive_update_and_rank_truncation_at_full_rank_is_the_adapter(x):
    model = peft_model("lora", rank=4)
    adapted = outputs(model, x)
    base, full = kn.base_weights(model), kn.tuned_weights(model)
    for name, layer in kn.tuner_layers(model).items():
        naive = (
            base[name]
            + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        )
        torch.testing.assert_close(full[name], naive)
    assert set(kn.update_rank(base, full).values()) == {4}
    plain = unloaded(model)
    with kn.loaded(plain, kn.truncated(base, full, 4)):
        torch.testing.assert_close(outputs(plain, x), adapted, rtol=1e-9, atol=1e-10)
    two = kn.truncated(base, full, 2)
    assert set(kn.update_rank(base, two).values()) == {2}
    for name in full:  # the best rank-2 approximation: what is left is the smaller singular values
        left = torch.linalg.svdvals(full[name] - two[name])
        torch.testing.assert_close(left[:2], torch.linalg.svdvals(full[name] - base[name])[2:4])


def test_scale_knob_is_peft_scale_for_lora_and_the_pretrained_model_at_zero(x):
    model = peft_model("lora")
    base, full = kn.base_weights(model), kn.tuned_weights(model)
    for layer in kn.tuner_layers(model).values():
        layer.set_scale("default", 0.5)
    peft_half = outputs(model, x)
    plain = unloaded(model)
    pretrained = outputs(plain, x)
    with kn.loaded(plain, kn.scaled(base, full, 0.5)):
        torch.testing.assert_close(outputs(plain, x), peft_half)
    with kn.loaded(plain, kn.scaled(base, full, 0.0)):
        assert torch.equal(outputs(plain, x), pretrained)
    assert torch.equal(outputs(plain, x), pretrained)  # the weights are put back after


def test_dora_scale_zero_is_pretrained_and_full_scale_is_the_adapter(x):
    model = peft_model("dora")
    adapted = outputs(model, x)
    base, full = kn.base_weights(model), kn.tuned_weights(model)
    plain = unloaded(model)
    pretrained = outputs(plain, x)
    assert not torch.allclose(adapted, pretrained)
    with kn.loaded(plain, kn.scaled(base, full, 1.0)):
        torch.testing.assert_close(outputs(plain, x), adapted)
    with kn.loaded(plain, kn.scaled(base, full, 0.0)):
        assert torch.equal(outputs(plain, x), pretrained)


def test_oft_rotation_knob_goes_from_the_adapter_to_the_pretrained_model_through_rotations(x):
    model = peft_model("oft")
    with torch.no_grad():  # small generators: PEFT's Cayley-Neumann series is then a rotation
        for name, p in model.named_parameters():
            if "oft_" in name:
                p.mul_(0.1)
    adapted = outputs(model, x)
    base, full = kn.base_weights(model), kn.tuned_weights(model)
    half = kn.rotation_weights(model, 0.5)
    zero = kn.rotation_weights(model, 0.0)
    torch.testing.assert_close(kn.tuned_weights(model), full)  # the generators are put back
    torch.testing.assert_close(outputs(model, x), adapted)
    for name in full:
        torch.testing.assert_close(zero[name], base[name])
        # W R^T with R orthogonal keeps W W^T; the rotation at 0.5 lies between
        for w in (full[name], half[name]):
            torch.testing.assert_close(w @ w.T, base[name] @ base[name].T, atol=1e-4, rtol=1e-4)
        assert 0 < (half[name] - base[name]).norm() < (full[name] - base[name]).norm()


def test_random_removal_keeps_the_count_of_top_k_among_live_atoms():
    live = {
        "a": torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool),
        "b": torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool),
    }
    contribution = {
        "a": torch.tensor([0.1, 0.5, 0.3, 0.2, 9.0, 9.0]),
        "b": torch.tensor([0.2, 5.0, 0.1, 0, 0, 0]),
    }
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 4):
        top = kn.topk_masks(contribution, live, k)
        chance = kn.random_masks(live, k, g)
        for name in live:
            assert int(top[name].sum()) == int(chance[name].sum()) == min(k, int(live[name].sum()))
            assert not (top[name] & ~live[name]).any() and not (chance[name] & ~live[name]).any()
    assert kn.topk_masks(contribution, live, 2)["a"].tolist() == [False, True, True, False, False, False]
    draws = {tuple(kn.random_masks(live, 2, g)["a"].tolist()) for _ in range(20)}
    assert len(draws) > 1  # random, not a fixed choice


def test_at_identity_interpolates_the_first_crossing():
    curve = [
        {"feature_cosine": 0.9, "alignment": 0.2},
        {"feature_cosine": 0.8, "alignment": 0.6},
        {"feature_cosine": 0.85, "alignment": 0.9},
        {"feature_cosine": 0.7, "alignment": 1.0},
    ]
    assert at_identity(curve, 0.85) == pytest.approx(0.4)
    assert at_identity(curve, 0.75) == pytest.approx(0.9 + (0.1 / 0.15) * 0.1)
    assert at_identity(curve, 0.95) is None


def _record(source: str, seed: int, alignments: list[float], diverged: bool = False) -> dict:
    """A run record: its full adapter and one knob's points, identity falling with alignment rising."""
    point = lambda a: {m: (a if m == "alignment" else 1.0 - a) for m in METRICS}  # noqa: E731
    record = {"source": source, "seed": seed, "full": point(alignments[0])}
    if diverged:
        return {**record, "diverged": True, "curves": {}}
    return {**record, "curves": {"scale": [{"value": 0.5, **point(a)} for a in alignments[1:]]}}


def test_a_diverged_run_is_counted_and_left_out_of_the_curves_it_cannot_have():
    base = [{"source": s, "seed": 0, **{m: 0.5 for m in METRICS}} for s in ("a", "b")]
    runs = {
        "pretrained": base,
        "lora": [_record("a", 0, [0.2, 0.4]), _record("b", 0, [0.0, 0.0], diverged=True)],
        "dora": [_record("a", 0, [0.1, 0.3]), _record("b", 0, [0.3, 0.5])],
    }
    row = strength(runs)
    assert row["diverged"] == {"lora": 1, "dora": 0}
    assert row["full"]["lora"]["alignment"] == pytest.approx(0.2)  # the finite run alone
    assert row["full"]["dora"]["alignment"] == pytest.approx(0.2)  # the mean of 0.1 and 0.3
    table = "\n".join(_strength_lines({"strengths": [{"learning_rate": 1e-2, **row}]}))
    assert "| 0.01 | 0.20 (0.800), 1 diverged | 0.20 (0.800) |" in table


def test_sources_are_distinct_real_samples_with_one_attribute_changed_per_target():
    report, selection = make_sources((9, 3, 9), (9,))
    nines = [s.image for s in report + selection if s.digit == 9]
    assert all(not torch.equal(a, b) for i, a in enumerate(nines) for b in nines[i + 1 :])
    for source in report + selection:
        a = source.attributes
        assert a.size == "small" and source.prompt == a.caption()
        for t in source.targets:
            b = t.attributes
            changed = {k for k in ("color", "place", "size") if getattr(a, k) != getattr(b, k)}
            assert changed == {t.kind} or (t.kind == "size" and changed <= {"size", "place"})
        assert [t.kind for t in source.targets] == ["color", "color", "place", "place", "size", "size"]


def test_bad_settings_are_one_clear_error():
    for kwargs, message in [
        ({"methods": ("atoms", "ia3")}, "unknown method"),
        ({"num_atoms": 64, "atom_budget": 80}, "atom budget must be in 1..64"),
        ({"scales": (0.5, 1.5)}, "scales must lie strictly between 0 and 1"),
        ({"ranks": (0,)}, "ranks must be ≥ 1"),
        ({"digits": (9, 12)}, "digits must be in 0..9"),
        ({"seeds": (0, 100)}, "selection seed 100 must not be a report seed"),
        ({"learning_rates": ()}, "learning rates must not be empty"),
    ]:
        with pytest.raises(AtomtuneError, match=message):
            EditBenchSettings(**kwargs)


def test_reduced_run_writes_every_output_in_range_and_resumes_without_training(tmp_path, monkeypatch):
    settings = EditBenchSettings(
        digits=(9, 3), selection_digits=(4,), seeds=(0,), learning_rates=(1e-4, 1e-3), steps=2,
        num_atoms=12, atom_budget=2, scales=(0.5,), ranks=(1,), sample_steps=2,
    )  # fmt: skip
    out = tmp_path / "edit"
    report = run_edit_bench(settings, out, progress=False)
    for name in ("edit_bench.json", "edit_bench.md", "edit_curves.png", "edit_grid.png"):
        assert (out / name).is_file(), name
    assert set(report["chosen_learning_rate"]) == {"atoms", "lora", "dora", "oft"}
    names = {
        "atoms: top-k",
        "atoms: random-k",
        "lora: scale",
        "lora: rank",
        "dora: scale",
        "dora: rank",
        "oft: rotation",
    }
    assert set(report["curves"]) == names
    for curve in report["curves"].values():
        assert curve[0]["value"] == "full" and curve[-1]["value"] == 0
        for point in curve:
            for key in ("alignment", "alignment_color", "alignment_place", "alignment_size", "p_source"):
                assert 0.0 <= point[key] <= 1.0, key
            assert -1.0 <= point["feature_cosine"] <= 1.0
    for values in report["matched_alignment"].values():
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
    atoms = report["runs"]["atoms"][0]["curves"]
    assert [p["kept"] for p in atoms["top-k"]] == [p["kept"] for p in atoms["random-k"]]
    table = (out / "edit_bench.md").read_text()
    assert "| atoms: top-k |" in table and "| lora: rank |" in table
    # every rate of the grid is reported; at each method's kept rate its row is the main table's run
    assert [row["learning_rate"] for row in report["strengths"]] == [1e-4, 1e-3]
    for method, lr in report["chosen_learning_rate"].items():
        row = next(r for r in report["strengths"] if r["learning_rate"] == lr)
        name = next(n for n in report["curves"] if n.startswith(f"{method}: "))
        assert row["full"][method]["alignment"] == report["curves"][name][0]["alignment"]
    assert set(report["strengths"][0]["topk_against"]) == names - {"atoms: top-k"}
    assert "| learning rate | atoms: full |" in table and "| 0.001 |" in table
    for lr in ("0.0001", "0.001"):  # both rates trained on the report sources, not only the kept one
        assert len(list((out / "runs" / "lora" / f"lr-{lr}").glob("*/seed-0/result.json"))) == 2
    stamp = (out / "edit_bench.json").stat().st_mtime_ns
    monkeypatch.setattr(_Bench, "_train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = run_edit_bench(settings, out, progress=False)
    assert again["curves"] == json.loads(json.dumps(report["curves"]))
    assert (out / "edit_bench.json").stat().st_mtime_ns != stamp
    with pytest.raises(AtomtuneError, match="other settings"):
        run_edit_bench(EditBenchSettings(steps=3), out, progress=False)
