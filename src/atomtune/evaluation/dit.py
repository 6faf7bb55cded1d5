"""The benchmark's default ``train_and_generate``: atomtune's DiT workflow (PixArt) for one subject.

For a ``BenchmarkJob``: load the pipeline, fine-tune it on the subject's images with the job's
method (``atoms``, ``lora``, ``dora``, ``oft``: ``atomtune.workflows.train.train``; ``base``
skips training and scores the pretrained model), then generate every evaluation prompt × seed with
the adapter active and write the images and ``manifest.json`` into ``job.images_dir``. A trained
adapter left by an interrupted run (``OUT/runs/METHOD/SUBJECT/train/adapter``) is loaded instead of
training again.

Under ``accelerate launch`` with several processes, each job runs in a child Python process that
sees only this process's GPU and no distributed environment: the trainer's own ``Accelerator``
would otherwise join all processes into one data-parallel run, mixing the gradients of different
subjects. Every job thus trains exactly as it would on one GPU, and results do not depend on the
number of GPUs.

The ``atomtune.diffusion`` modules are imported when a job runs, never at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from atomtune.errors import AtomtuneError
from atomtune.evaluation.runner import BenchmarkJob
from atomtune.io import atomic_write, save_png
from atomtune.validation import check_number, check_type
from atomtune.workflows.manifest import ImageRecord, default_image_path, write_manifest

#: generation options (``--generate-arg KEY=VALUE``) and their defaults
GENERATE_DEFAULTS: dict[str, Any] = {
    "steps": 20,
    "guidance_scale": 4.5,
    "resolution": None,
    "negative_prompt": "",
}
#: environment variables of a distributed launch, removed for the child process
_DISTRIBUTED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
)


def dit_train_and_generate(
    job: BenchmarkJob,
    pretrained: str | None = None,
    train_options: Mapping[str, Any] | None = None,
    generate_options: Mapping[str, Any] | None = None,
    prior_preservation: bool = False,
    isolate: bool | None = None,
    progress: bool = True,
) -> Path:
    """Train ``job.method`` on ``job.subject`` and generate its prompts × seeds into ``job.images_dir``.

    ``train_options``: further ``TrainSettings`` fields (``max_steps``, ``learning_rate``,
    ``mixed_precision``, ``num_atoms`` ...); ``generate_options``: ``GENERATE_DEFAULTS``' keys.
    ``prior_preservation``: train with the class prompt ("a photo of dog") and class images of the
    base model, as DreamBooth does. ``isolate`` (default: when several processes run) runs the job in
    a child process pinned to this process's GPU.
    """
    gen = _generate_options(generate_options)
    spec = {
        "job": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items()},
        "pretrained": pretrained,
        "train_options": dict(train_options or {}),
        "generate_options": gen,
        "prior_preservation": prior_preservation,
        "progress": progress,
    }
    spec["job"]["instance_images"] = [str(p) for p in job.instance_images]
    if isolate is None:
        from accelerate import PartialState

        isolate = PartialState().num_processes > 1
    if isolate:
        return _run_child(job, spec)
    return _run(spec)


def _generate_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(GENERATE_DEFAULTS))
    if unknown:
        raise AtomtuneError(
            f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(GENERATE_DEFAULTS)})"
        )
    gen = {**GENERATE_DEFAULTS, **options}
    check_number("generation option steps", gen["steps"], integer=True, minimum=1)
    check_number("generation option guidance_scale", gen["guidance_scale"], minimum=0)
    if gen["resolution"] is not None:
        check_number("generation option resolution", gen["resolution"], integer=True, minimum=1)
    check_type("generation option negative_prompt", gen["negative_prompt"], str, "a string")
    return gen


def check_options(
    train_options: Mapping[str, Any] | None, generate_options: Mapping[str, Any] | None
) -> None:
    """Refuse bad ``--train-arg`` / ``--generate-arg`` values before the first job starts."""
    from atomtune.workflows.train import TrainSettings

    _generate_options(generate_options)
    options = {k: v for k, v in dict(train_options or {}).items() if k != "pretrained"}
    token = options.get("token", "sks")
    prompt = f"a {token} thing" if isinstance(token, str) and token.strip() else "a sks thing"
    # the job's own fields (data, prompt, output) are placeholders here: only the options are checked
    job = {"instance_data": "instance", "instance_prompt": prompt, "output_dir": "output"}
    TrainSettings.build(**{**job, **options})


def _job_from(spec: Mapping[str, Any]) -> BenchmarkJob:
    data = dict(spec["job"])
    data["instance_images"] = tuple(Path(p) for p in data["instance_images"])
    data["out_dir"] = Path(data["out_dir"])
    for key in ("prompts", "seeds"):
        data[key] = tuple(data[key])
    return BenchmarkJob(**data)


def _run(spec: Mapping[str, Any]) -> Path:
    from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED, load_pipeline, pipeline_name
    from atomtune.diffusion.spec import spec_for

    job = _job_from(spec)
    gen = spec["generate_options"]
    options = dict(spec["train_options"])
    pretrained = spec["pretrained"] or options.pop("pretrained", None) or DEFAULT_PRETRAINED
    train_dir = job.out_dir / "train"
    adapter_dir = train_dir / "adapter"
    settings = None
    if job.method != "base":
        from atomtune.workflows.train import TrainSettings

        values = {
            "instance_data": str(job.instance_images[0].parent),
            "instance_prompt": job.instance_prompt,
            "output_dir": str(train_dir),
            "pretrained": pretrained,
            "token": job.token,
            "method": job.method,
            "seed": job.seeds[0],
            **options,
        }
        if spec["prior_preservation"]:
            values.setdefault("class_prompt", job.class_prompt)
        settings = TrainSettings.build(**values)

    dtype = options.get("dtype", "auto")  # base: only the loading options (dtype, variant, ...) apply
    if settings is not None:  # the trainer's rule: weights in the mixed-precision dtype unless told
        dtype = settings.weight_dtype()
    local = bool(options.get("local_files_only", False))
    pipe = load_pipeline(pretrained, dtype, options.get("variant"), job.device, local)
    if settings is not None:
        if (adapter_dir / "training.json").is_file():
            from atomtune.diffusion.adapters import load_adapters

            load_adapters(pipe.transformer, [adapter_dir], pipeline_name(pipe))
        else:
            from atomtune.workflows.train import train

            train(settings, pipe=pipe, progress=spec["progress"])
    pipe.transformer.eval()
    model = spec_for(pipe)
    resolution = gen["resolution"] or (settings.resolution if settings else None) or model.native_resolution
    model.check_resolution(resolution)

    import torch

    from atomtune.workflows.generate import draw

    records = []
    adapter = str(adapter_dir) if settings is not None else None
    desc = f"generate {job.subject}/{job.method}"
    args = (
        gen["steps"],
        gen["guidance_scale"],
        resolution,
        resolution,
        gen["negative_prompt"],
        spec["progress"],
    )
    with torch.no_grad():
        for i, seed, image in draw(model, list(job.prompts), list(job.seeds), *args, desc=desc):
            rel = default_image_path(job.method, job.subject, i, job.prompts[i], seed)
            save_png(image, job.images_dir / rel)
            records.append(ImageRecord(rel, job.subject, job.prompts[i], seed, job.method, adapter))
    metadata = {
        "unique_token": job.token,
        "pretrained": pipeline_name(pipe),
        "method": job.method,
        "resolution": resolution,
        "generate": gen,
        "train": settings.to_dict() if settings is not None else None,
    }
    write_manifest(job.images_dir, records, metadata)
    return job.images_dir


def child_env(environ: Mapping[str, str], gpu_index: int | None) -> dict[str, str]:
    """``environ`` without a distributed launch's variables, with only GPU ``gpu_index`` visible
    (an index into the parent's ``CUDA_VISIBLE_DEVICES`` when that is set)."""
    env = {
        k: v
        for k, v in environ.items()
        if k not in _DISTRIBUTED_ENV and not k.startswith(("TORCHELASTIC_", "ACCELERATE_", "TORCH_NCCL_"))
    }
    if gpu_index is not None:
        visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[gpu_index] if gpu_index < len(visible) else str(gpu_index)
    return env


def _run_child(job: BenchmarkJob, spec: dict[str, Any]) -> Path:
    from accelerate import PartialState

    state = PartialState()
    gpu = state.local_process_index if state.device.type == "cuda" else None
    if gpu is not None:
        spec["job"]["device"] = "cuda"
    job.out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = job.out_dir / "job.json"
    atomic_write(spec_path, lambda p: p.write_text(json.dumps(spec, indent=2) + "\n"))
    done = subprocess.run(
        [sys.executable, "-m", "atomtune.evaluation.dit", str(spec_path)], env=child_env(os.environ, gpu)
    )
    if done.returncode:
        raise AtomtuneError(
            f"training/generation of {job.subject}/{job.method} failed in its worker process "
            f"(exit code {done.returncode}; its messages are above)"
        )
    return job.images_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m atomtune.evaluation.dit JOB.json``: one job in a process of its own."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m atomtune.evaluation.dit JOB.json", file=sys.stderr)
        return 2
    try:
        _run(json.loads(Path(argv[0]).read_text()))
    except AtomtuneError as exc:
        print(f"atomtune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
