"""Training state round-trips through safetensors; a resumed pretraining equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from atomtune.checkpoint import latest_checkpoint, load_training_state, save_training_state
from atomtune.errors import AtomtuneError


def test_optimizer_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    save_training_state(tmp_path / "checkpoint-3", dict(model.state_dict()), opt, 3, {"note": "x"})
    expected_noise = torch.randn(4)
    fresh = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    tensors, step, extra = load_training_state(tmp_path / "checkpoint-3", opt2)
    fresh.load_state_dict(tensors)
    assert step == 3 and extra == {"note": "x"}
    assert torch.equal(torch.randn(4), expected_noise)  # RNG restored to the save point
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, opt2)):
        m(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(model.weight, fresh.weight)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(AtomtuneError, match="no checkpoint in"):
        load_training_state(tmp_path)
    save_training_state(tmp_path / "c", {"w": torch.ones(2)}, None, 1)
    (tmp_path / "c" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(AtomtuneError, match="is corrupt"):
        load_training_state(tmp_path / "c")
    assert latest_checkpoint(tmp_path) is None


def test_pretraining_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from atomtune.testbed.pretrain import PretrainSettings, pretrain

    settings = dict(batch=4, warmup=2, checkpoint_every=1)
    whole = pretrain(PretrainSettings(steps=2, **settings), tmp_path / "whole", progress=False)
    pretrain(PretrainSettings(steps=1, **settings), tmp_path / "split", progress=False)
    (tmp_path / "split" / "digit_dit.safetensors").unlink()
    resumed = pretrain(PretrainSettings(steps=2, **settings), tmp_path / "split", progress=False)
    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
