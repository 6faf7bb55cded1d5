"""The benchmark's DiT train_and_generate on the tiny PixArt pipeline: images + manifest, resumable."""

from __future__ import annotations

import json
import subprocess
from functools import partial

import pytest
from test_evaluation import make_dataset

from atomtune.errors import AtomtuneError
from atomtune.evaluation import dit
from atomtune.evaluation.prompts import load_dreambooth
from atomtune.evaluation.runner import make_jobs, run_benchmark
from atomtune.evaluation.tiny import tiny_evaluator
from atomtune.workflows.manifest import read_manifest

TRAIN = {"max_steps": 2, "num_atoms": 8}
GENERATE = {"steps": 1}


@pytest.fixture
def job(tmp_path):
    data = load_dreambooth(make_dataset(tmp_path / "dataset", images=2))
    return make_jobs(data, ["dog"], ["atoms"], tmp_path / "out", 1, 3, "sks", "cpu")[0]


def test_benchmark_trains_generates_and_reuses_the_adapter(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "dataset", images=2)
    out = tmp_path / "out"

    def train_and_generate(job):
        return dit.dit_train_and_generate(
            job, pretrained="tiny", train_options=TRAIN, generate_options=GENERATE, progress=False
        )

    results = run_benchmark(
        dataset,
        train_and_generate,
        tiny_evaluator(),
        out,
        subjects=["dog"],
        methods=["atoms", "base"],
        images_per_prompt=1,
        seed=3,
        progress=False,
    )
    assert results["methods"]["base"]["subjects"]["dog"]["images"] == 2
    assert "| **base** | **mean of 1 subject** |" in (out / "results.md").read_text()
    folder = out / "runs" / "atoms" / "dog" / "images"
    manifest = read_manifest(folder)
    assert [(r.prompt, r.seed, r.method) for r in manifest.records] == [
        ("a sks dog in the jungle", 3, "atoms"),
        ("a sks dog wearing a red hat", 3, "atoms"),
    ]
    assert manifest.records[0].adapter == str(out / "runs" / "atoms" / "dog" / "train" / "adapter")
    assert manifest.metadata["unique_token"] == "sks" and manifest.metadata["train"]["max_steps"] == 2
    assert read_manifest(out / "runs" / "base" / "dog" / "images").records[0].adapter is None
    first = (folder / manifest.records[1].file).read_bytes()

    # the isolated path (what several processes use) through the child's entry point, in-process;
    # the adapter trained above is loaded, not trained again, and the images come out the same
    def fake_run(cmd, env):
        assert cmd[1:3] == ["-m", "atomtune.evaluation.dit"] and "RANK" not in env
        return subprocess.CompletedProcess(cmd, dit.main(cmd[3:]))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(dit.subprocess, "run", fake_run)
    monkeypatch.setattr("atomtune.workflows.train.train", no_training)
    monkeypatch.setenv("RANK", "0")
    (out / "results" / "atoms" / "dog.json").unlink()
    (folder / "manifest.json").unlink()
    again = run_benchmark(
        dataset,
        partial(dit.dit_train_and_generate, pretrained="tiny", train_options=TRAIN, generate_options=GENERATE,
                isolate=True, progress=False),
        tiny_evaluator(),
        out,
        subjects=["dog"],
        methods=["atoms", "base"],
        images_per_prompt=1,
        seed=3,
        progress=False,
    )  # fmt: skip
    assert (folder / manifest.records[1].file).read_bytes() == first
    assert again == results
    assert json.loads((out / "runs" / "atoms" / "dog" / "job.json").read_text())["job"]["subject"] == "dog"


def test_child_env_drops_the_distributed_launch():
    parent = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "MASTER_PORT": "1",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "PATH": "/bin",
    }
    assert dit.child_env(parent, None) == {"PATH": "/bin"}
    assert dit.child_env(parent, 2)["CUDA_VISIBLE_DEVICES"] == "2"
    assert dit.child_env({**parent, "CUDA_VISIBLE_DEVICES": "4,5,6"}, 1)["CUDA_VISIBLE_DEVICES"] == "5"


def test_bad_options(job):
    with pytest.raises(AtomtuneError, match="unknown generation option"):
        dit.dit_train_and_generate(job, pretrained="tiny", generate_options={"stepz": 1}, isolate=False)
    with pytest.raises(AtomtuneError, match="unknown setting"):
        dit.dit_train_and_generate(job, pretrained="tiny", train_options={"no_such": 1}, isolate=False)
