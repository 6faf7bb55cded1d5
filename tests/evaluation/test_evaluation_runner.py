"""The DreamBooth benchmark runner and the eval commands: resumable, atomic, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluation import make_dataset, make_generations

import atomtune.core.serialization
from atomtune.cli import main
from atomtune.errors import AtomtuneError
from atomtune.evaluation.runner import BenchmarkJob, run_benchmark, synthetic_train_and_generate
from atomtune.evaluation.tiny import tiny_evaluator


class Counting:
    """A fake train_and_generate that counts its calls and can fail on a chosen subject."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on

    def __call__(self, job: BenchmarkJob):
        self.calls.append((job.subject, job.method))
        if job.subject == self.fail_on:
            raise RuntimeError("out of memory (pretend)")
        return synthetic_train_and_generate(job, size=32)


@pytest.fixture(scope="module")
def evaluator():
    return tiny_evaluator(batch_size=8)


def run(dataset, out, fake, evaluator, **kw):
    kw.setdefault("methods", ["atoms", "lora"])
    kw.setdefault("images_per_prompt", 2)
    return run_benchmark(dataset, fake, evaluator, out, progress=False, **kw)


def test_jobs_follow_the_dataset(tmp_path, evaluator):
    dataset = make_dataset(tmp_path / "dataset")
    jobs = []

    def record(job):
        jobs.append(job)
        return synthetic_train_and_generate(job, size=32)

    run(dataset, tmp_path / "out", record, evaluator, subjects=["dog", "can"], methods=["atoms"], seed=5)
    dog, can = jobs
    assert dog.live and not can.live
    assert dog.prompts == ("a sks dog in the jungle", "a sks dog wearing a red hat")
    assert can.prompts == ("a sks can in the jungle", "a shiny sks can")
    assert dog.seeds == (5, 6) and dog.instance_prompt == "a photo of sks dog"
    assert dog.class_prompt == "a photo of dog" and len(dog.instance_images) == 3
    assert dog.images_dir == tmp_path / "out" / "runs" / "atoms" / "dog" / "images"


def test_resumed_run_skips_finished_subjects(tmp_path, evaluator):
    dataset = make_dataset(tmp_path / "dataset")
    out = tmp_path / "out"
    first = Counting(fail_on="can")
    with pytest.raises(RuntimeError, match="pretend"):
        run(dataset, out, first, evaluator)
    assert first.calls == [("dog", "atoms"), ("dog", "lora"), ("can", "atoms")]
    # what finished before the failure is on disk, complete and valid
    partial = json.loads((out / "results.json").read_text())
    assert partial["benchmark"]["finished"] == 2 and list(partial["methods"]["atoms"]["subjects"]) == ["dog"]
    assert not list(out.rglob("*.tmp"))

    second = Counting()
    results = run(dataset, out, second, evaluator)
    assert second.calls == [
        ("can", "atoms"),
        ("can", "lora"),
        ("bear_plushie", "atoms"),
        ("bear_plushie", "lora"),
    ]
    assert results["benchmark"] == {"finished": 6, "planned": 6, "output": str(out)}
    assert results["methods"]["lora"]["mean"]["subjects"] == 3

    third = Counting()
    again = run(dataset, out, third, evaluator)
    assert third.calls == [] and again == results

    # a call for fewer subjects or methods keeps the others in the tables
    fewer = run(dataset, out, Counting(), evaluator, subjects=["can"], methods=["lora"])
    assert fewer["methods"] == results["methods"]
    assert fewer["benchmark"]["finished"] == fewer["benchmark"]["planned"] == 1

    # results lost but images kept: scored again without training again, same numbers
    (out / "results" / "lora" / "dog.json").unlink()
    fourth = Counting()
    redone = run(dataset, out, fourth, evaluator)
    assert fourth.calls == [] and redone == results


def test_results_files_and_table(tmp_path, evaluator):
    dataset = make_dataset(tmp_path / "dataset")
    out = tmp_path / "out"
    results = run(dataset, out, Counting(), evaluator, subjects=["bear_plushie", "dog"])
    assert json.loads((out / "results.json").read_text()) == results
    dog = results["methods"]["atoms"]["subjects"]["dog"]
    assert dog["class"] == "dog" and dog["live"] and dog["images"] == 4 and dog["real_images"] == 3
    assert len(dog["prompts"]) == 2
    per_pair = json.loads((out / "results" / "atoms" / "dog.json").read_text())
    assert per_pair["scores"] == dog and per_pair["models"]["dino"] == "tiny-dino (random weights)"
    mean = results["methods"]["atoms"]["mean"]
    bear = results["methods"]["atoms"]["subjects"]["bear_plushie"]
    assert mean["dino"] == pytest.approx((dog["dino"] + bear["dino"]) / 2)
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| method | subject | class | images | DINO | CLIP-I | CLIP-T |"
    assert table[2].startswith("| atoms | dog | dog | 4 | ")  # the dataset's order
    assert table[3].startswith("| atoms | bear_plushie | stuffed animal | 4 | ")
    assert table[4].startswith("| **atoms** | **mean of 2 subjects** |  | 8 | **")
    assert len(table) == 2 + 2 * 3
    manifest = json.loads((out / "runs" / "lora" / "dog" / "images" / "manifest.json").read_text())
    assert {r["seed"] for r in manifest["images"]} == {0, 1} and len(manifest["images"]) == 4


def test_results_are_written_atomically(tmp_path, evaluator, monkeypatch):
    written: list[str] = []
    real = atomtune.core.serialization.atomic_write

    def spy(path, write):
        written.append(Path(path).name)
        return real(path, write)

    for module in ("runner", "evaluate"):
        monkeypatch.setattr(f"atomtune.evaluation.{module}.atomic_write", spy)
    run(
        make_dataset(tmp_path / "dataset"),
        tmp_path / "out",
        Counting(),
        evaluator,
        subjects=["dog"],
        methods=["atoms"],
    )
    assert {"run.json", "dog.json", "results.json", "results.md"} <= set(written)
    json_files = {p.name for p in (tmp_path / "out").rglob("*.json") if "images" not in p.parts}
    assert json_files <= set(written)


def test_resume_with_other_settings_is_refused(tmp_path, evaluator):
    dataset = make_dataset(tmp_path / "dataset")
    run(dataset, tmp_path / "out", Counting(), evaluator, subjects=["dog"], methods=["atoms"])
    with pytest.raises(AtomtuneError, match=r"other settings .*images_per_prompt: 2 -> 3"):
        run(dataset, tmp_path / "out", Counting(), evaluator, subjects=["dog"], images_per_prompt=3)


def test_incomplete_generation_is_an_error(tmp_path, evaluator):
    def lazy(job):
        synthetic_train_and_generate(job, size=32)
        manifest = json.loads((job.images_dir / "manifest.json").read_text())
        manifest["images"] = manifest["images"][:-1]
        (job.images_dir / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(
        AtomtuneError, match=r"expected 4 images of dog/atoms \(2 prompts × 2 seeds\), found 3"
    ):
        run(make_dataset(tmp_path / "dataset"), tmp_path / "out", lazy, evaluator, subjects=["dog"])


def test_unknown_subject_and_missing_images(tmp_path, evaluator):
    dataset = make_dataset(tmp_path / "dataset")
    with pytest.raises(AtomtuneError, match="unknown DreamBooth subject 'dog9'"):
        run(dataset, tmp_path / "out", Counting(), evaluator, subjects=["dog9"])
    for f in (dataset / "can").iterdir():
        f.unlink()
    with pytest.raises(AtomtuneError, match="holds no images"):
        run(dataset, tmp_path / "out", Counting(), evaluator, subjects=["can"])


# -- command line -----------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """The commands with the main CLI's convention: an AtomtuneError becomes one line + exit 2."""
    return main(argv)


def test_eval_command(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "dataset")
    gen = tmp_path / "gen"
    make_generations(gen, subjects=("dog", "can"))
    assert cli(["eval", str(gen), "--real", str(dataset), "--tiny-models", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| atoms | dog | 4 |" in out and "**mean of 2 subjects**" in out
    results = json.loads((gen / "eval.json").read_text())
    assert set(results["methods"]["atoms"]["subjects"]) == {"dog", "can"}
    assert (gen / "eval.md").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "{tmp}/nope", "--real", "{tmp}"], "generation folder not found"),
        (["eval", "{tmp}", "--real", "{tmp}"], "manifest.json is missing"),
        (
            ["benchmark-dreambooth", "--dataset", "{tmp}/nope", "--out", "{tmp}/o", "--tiny-models"],
            "not found",
        ),
        (
            [
                "benchmark-dreambooth",
                "--dataset",
                "{data}",
                "--out",
                "{tmp}/o",
                "--subjects",
                "cat",
                "--tiny-models",
            ],
            "unknown DreamBooth subject 'cat'",
        ),
        (
            [
                "benchmark-dreambooth",
                "--dataset",
                "{data}",
                "--out",
                "{tmp}/o",
                "--train-arg",
                "steps",
                "--tiny-models",
            ],
            "--train-arg takes KEY=VALUE",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    data = make_dataset(tmp_path / "dataset")
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_benchmark_command_resumes(tmp_path, capsys):
    data = make_dataset(tmp_path / "dataset")
    argv = [
        "benchmark-dreambooth",
        "--dataset",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--subjects",
        "dog,can",
    ]
    argv += ["--generator", "synthetic", "--images-per-prompt", "1", "--tiny-models", "--quiet"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "| atoms | can | can | 2 |" in out and "2/2 (subject, method) pairs done" in out
    assert cli(argv) == 0
    assert "2/2 (subject, method) pairs done" in capsys.readouterr().out
    assert cli([*argv[:-3], "2", "--tiny-models", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_main_cli_has_the_commands():
    from atomtune.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert "eval" in commands and "benchmark-dreambooth" in commands
