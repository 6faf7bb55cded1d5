"""The DreamBooth benchmark: for each subject and method, train → generate → evaluate; resumable.

For every (subject, method) pair a ``BenchmarkJob`` goes to ``train_and_generate``, which fine-tunes
on the subject's real images and writes the 25 evaluation prompts × N images, with a
``manifest.json`` (see ``manifest.py``), into ``job.images_dir``. The images are then scored (DINO,
CLIP-I, CLIP-T, see ``metrics.py``) and the pair's scores are written at once. The output folder::

    OUT/run.json                      the run's settings; a resumed run must use the same ones
    OUT/results.json, OUT/results.md  all finished pairs (of this call and earlier ones with the same
                                      settings): per subject, and mean per method
    OUT/results/METHOD/SUBJECT.json   one file per finished pair (what resuming looks at)
    OUT/runs/METHOD/SUBJECT/          the job's folder: adapter, images/, images/manifest.json

Run it again with the same ``OUT`` and the finished pairs are skipped; a pair whose images are
all there but that was not scored yet is scored without training again. Every file is written
atomically, so an interrupted run leaves finished pairs intact.

Several GPUs: launch with ``accelerate launch`` and the pending pairs are split between the
processes (``PartialState.split_between_processes``); each process trains, generates and scores
its share on its own GPU, and the main process writes the final ``results.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError
from atomtune.evaluation.evaluate import assemble, write_results
from atomtune.evaluation.metrics import Evaluator, open_image
from atomtune.evaluation.prompts import DEFAULT_TOKEN, DreamBoothDataset, load_dreambooth
from atomtune.io import atomic_write, check_same_settings
from atomtune.progress import progress_bar
from atomtune.workflows.manifest import ImageRecord, default_image_path, read_manifest, write_manifest

RUN_FORMAT = "atomtune-dreambooth-benchmark"


@dataclass(frozen=True)
class BenchmarkJob:
    """One (subject, method) pair: what ``train_and_generate`` gets."""

    subject: str
    class_name: str
    live: bool
    method: str
    token: str
    instance_images: tuple[Path, ...]  # the subject's real images, to fine-tune on
    instance_prompt: str  # "a photo of sks dog": DreamBooth's training prompt
    class_prompt: str  # "a photo of dog": for prior preservation, if the method uses it
    prompts: tuple[str, ...]  # the 25 evaluation prompts, unique token and class filled in
    seeds: tuple[int, ...]  # one image per seed and prompt
    out_dir: Path  # the job's folder (adapter, logs, ...)
    device: str

    @property
    def images_dir(self) -> Path:
        """Where the images and their ``manifest.json`` must be written."""
        return self.out_dir / "images"

    def expected(self) -> set[tuple[str, int]]:
        return {(p, s) for p in self.prompts for s in self.seeds}


TrainAndGenerate = Callable[[BenchmarkJob], Any]
EvaluatorLike = Evaluator | Callable[[torch.device], Evaluator]


def make_jobs(
    dataset: DreamBoothDataset,
    subjects: Sequence[str] | None,
    methods: Sequence[str],
    out_dir: Path,
    images_per_prompt: int,
    seed: int,
    token: str,
    device: str,
) -> list[BenchmarkJob]:
    """Jobs subject by subject (all methods of a subject in a row), subjects in the order given
    (default: all, in the dataset's order)."""
    if images_per_prompt < 1:
        raise AtomtuneError(f"images per prompt must be at least 1, got {images_per_prompt}")
    if not methods:
        raise AtomtuneError("no methods to run")
    if len(set(methods)) != len(methods):
        raise AtomtuneError(f"a method is named twice: {', '.join(methods)}")
    if subjects and len(set(subjects)) != len(subjects):
        raise AtomtuneError(f"a subject is named twice: {', '.join(subjects)}")
    seeds = tuple(range(seed, seed + images_per_prompt))
    jobs = []
    for s in dataset.select(list(subjects) if subjects else None):
        for method in methods:
            jobs.append(
                BenchmarkJob(
                    subject=s.name,
                    class_name=s.class_name,
                    live=s.live,
                    method=method,
                    token=token,
                    instance_images=s.images,
                    instance_prompt=f"a photo of {token} {s.class_name}",
                    class_prompt=f"a photo of {s.class_name}",
                    prompts=tuple(dataset.prompts(s.name, token)),
                    seeds=seeds,
                    out_dir=out_dir / "runs" / method / s.name,
                    device=device,
                )
            )
    return jobs


def _result_path(out_dir: Path, job: BenchmarkJob) -> Path:
    return out_dir / "results" / job.method / f"{job.subject}.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AtomtuneError(f"{path} is not valid JSON ({exc}); delete it to redo that part") from exc


def _check_settings(out_dir: Path, settings: Mapping[str, Any]) -> None:
    path = out_dir / "run.json"
    if not path.is_file():
        return
    saved = _read_json(path)
    if not isinstance(saved, dict) or saved.get("format") != RUN_FORMAT:
        raise AtomtuneError(f"{path} is not an atomtune benchmark run file")
    check_same_settings(out_dir, saved.get("settings", {}), settings)


def _complete_manifest(job: BenchmarkJob) -> bool:
    """Whether the job's images are all there already (then only scoring is left)."""
    if not (job.images_dir / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(job.images_dir)
    except AtomtuneError:
        return False
    return _job_records(manifest.records, job, strict=False) is not None


def _job_records(records: Sequence[ImageRecord], job: BenchmarkJob, strict: bool = True):
    mine = [r for r in records if r.subject == job.subject and r.method == job.method]
    got = {(r.prompt, r.seed) for r in mine}
    if got == job.expected() and len(mine) == len(got):
        return mine
    if not strict:
        return None
    missing = job.expected() - got
    raise AtomtuneError(
        f"{job.images_dir}: expected {len(job.expected())} images of {job.subject}/{job.method} "
        f"({len(job.prompts)} prompts × {len(job.seeds)} seeds), found {len(mine)}"
        + (f"; missing e.g. {sorted(missing)[0]}" if missing else "; extra or repeated (prompt, seed) pairs")
    )


def collect(
    out_dir: Path,
    jobs: Sequence[BenchmarkJob],
    models: Mapping[str, str],
    token: str,
    subject_order: Sequence[str] = (),
) -> dict[str, Any]:
    """Every finished pair in ``out_dir`` (also those of earlier calls with other subjects or methods):
    this call's methods first, subjects in dataset order. ``benchmark`` counts this call's pairs."""
    methods = list(dict.fromkeys(j.method for j in jobs))
    results_dir = out_dir / "results"
    if results_dir.is_dir():
        methods += sorted(p.name for p in results_dir.iterdir() if p.is_dir() and p.name not in methods)
    rank = {name: i for i, name in enumerate(subject_order)}
    per_method: dict[str, dict[str, Any]] = {}
    for method in methods:
        folder = results_dir / method
        files = sorted(folder.glob("*.json"), key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
        for path in files:
            per_method.setdefault(method, {})[path.stem] = _read_json(path)["scores"]
    done = sum(_result_path(out_dir, j).is_file() for j in jobs)
    return assemble(
        per_method, models, token, benchmark={"finished": done, "planned": len(jobs), "output": str(out_dir)}
    )


def run_benchmark(
    dataset: str | Path | DreamBoothDataset,
    train_and_generate: TrainAndGenerate,
    evaluator: EvaluatorLike,
    out_dir: str | Path,
    subjects: Sequence[str] | None = None,
    methods: Sequence[str] = ("atoms",),
    images_per_prompt: int = 4,
    seed: int = 0,
    token: str = DEFAULT_TOKEN,
    settings: Mapping[str, Any] | None = None,
    models: Mapping[str, str] | None = None,
    progress: bool = True,
    state: Any = None,
) -> dict[str, Any]:
    """Train → generate → evaluate every (subject, method) not finished yet; return all results.

    ``dataset``: the DreamBooth ``dataset/`` folder (or the repository holding it). ``subjects``:
    names (default all 30). ``train_and_generate(job)`` must write the job's images and
    ``manifest.json`` into ``job.images_dir`` (see ``BenchmarkJob``). ``evaluator``: an
    ``Evaluator`` or a function ``device -> Evaluator`` (called only if something is left to
    score). ``settings``: what else must match when resuming (e.g. the base model, training steps);
    ``models``: the metric models' names for the results (default: the evaluator's).
    ``images_per_prompt`` images per prompt use seeds ``seed, seed+1, ...``; DreamBooth used 4.
    """
    data = dataset if isinstance(dataset, DreamBoothDataset) else load_dreambooth(dataset)
    out_dir = Path(out_dir)
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    device = str(state.device)
    jobs = make_jobs(data, subjects, list(methods), out_dir, images_per_prompt, seed, token, device)
    run_settings = {"images_per_prompt": images_per_prompt, "seed": seed, "token": token, **(settings or {})}
    classes = {name: s.class_name for name, s in data.subjects.items()}
    order = list(data.subjects)
    _check_settings(out_dir, run_settings)  # every process, so that all stop together on a mismatch
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {"format": RUN_FORMAT, "settings": run_settings}
        atomic_write(out_dir / "run.json", lambda p: p.write_text(json.dumps(run, indent=2) + "\n"))
    state.wait_for_everyone()

    pending = [j for j in jobs if not _result_path(out_dir, j).is_file()]
    names: dict[str, str] = dict(models or {})
    loaded: list[Evaluator] = []

    def get_evaluator() -> Evaluator:
        if not loaded:
            loaded.append(evaluator if isinstance(evaluator, Evaluator) else evaluator(state.device))
            names.update({k: v for k, v in loaded[0].names.items() if k not in names})
        return loaded[0]

    if isinstance(evaluator, Evaluator):
        names.update({k: v for k, v in evaluator.names.items() if k not in names})
    with state.split_between_processes(pending) as mine:
        bar = progress_bar(
            mine, desc="benchmark", unit="pair", disable=not (progress and state.is_local_main_process)
        )
        for job in bar:
            bar.set_postfix_str(f"{job.subject}/{job.method}")
            if not _complete_manifest(job):
                job.out_dir.mkdir(parents=True, exist_ok=True)
                train_and_generate(job)
            manifest = read_manifest(job.images_dir)
            records = _job_records(manifest.records, job)
            scores = get_evaluator().score(
                [manifest.path(r) for r in records], [r.prompt for r in records], job.instance_images, token
            )
            scores = {"class": job.class_name, "live": job.live, **scores}
            payload = {"subject": job.subject, "method": job.method, "models": names, "scores": scores}
            path = _result_path(out_dir, job)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p, payload=payload: p.write_text(json.dumps(payload, indent=2) + "\n"))
            write_results(collect(out_dir, jobs, names, token, order), out_dir / "results.json", classes)
    state.wait_for_everyone()
    if not names:  # nothing was scored in this call: take the names from the finished files
        for job in jobs:
            path = _result_path(out_dir, job)
            if path.is_file():
                names.update(_read_json(path).get("models", {}))
                break
    results = collect(out_dir, jobs, names, token, order)
    if state.is_main_process:
        write_results(results, out_dir / "results.json", classes)
    return results


# -- train_and_generate implementations ---------------------------------------------------------


def synthetic_train_and_generate(job: BenchmarkJob, size: int = 64) -> Path:
    """No training, no model: each "generated" image is a real image of the subject, resized, with
    seeded noise and a colour shift. For smoke runs of the benchmark's layout; numbers mean nothing."""
    import numpy as np
    from PIL import Image

    records = []
    for i, prompt in enumerate(job.prompts):
        for s in job.seeds:
            rng = np.random.default_rng([s, i])
            image = open_image(job.instance_images[int(rng.integers(len(job.instance_images)))])
            base = np.asarray(image.resize((size, size)), dtype=np.float32)
            shifted = base + rng.normal(0, 40, base.shape) + rng.normal(0, 30, (1, 1, 3))
            out = Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8))
            rel = default_image_path(job.method, job.subject, i, prompt, s)
            path = job.images_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p, out=out: out.save(p, format="PNG"))
            records.append(ImageRecord(rel, job.subject, prompt, s, job.method, None))
    write_manifest(job.images_dir, records, {"unique_token": job.token, "generator": "synthetic"})
    return job.images_dir
