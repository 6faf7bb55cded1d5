"""The training loop: DreamBooth-style customization of a diffusion transformer with atoms, LoRA,
DoRA or OFT, through Accelerate (devices, mixed precision, several processes)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from atomtune.diffusion.images import grid
from atomtune.diffusion.methods import apply_method
from atomtune.diffusion.pipeline import load_pipeline, pipeline_name
from atomtune.diffusion.spec import spec_for
from atomtune.diffusion.tuned import Tuned
from atomtune.errors import AtomtuneError
from atomtune.io import list_images, save_json, save_png, save_text
from atomtune.progress import progress_bar
from atomtune.workflows.train.card import model_card, training_record
from atomtune.workflows.train.checkpoints import (
    find_resume_folder,
    generator_states,
    load_checkpoint,
    save_checkpoint,
)
from atomtune.workflows.train.data import TrainingData, prepare_data
from atomtune.workflows.train.settings import TrainSettings


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    history: list[dict[str, float]]
    samples: list[Path]
    checkpoints: list[Path]
    class_images: list[Path]
    seconds: float
    tuned: Tuned | None = None
    is_main_process: bool = True  # under `accelerate launch`, only the main process writes


# -- the loop -----------------------------------------------------------------------------------
def train(settings: TrainSettings, pipe=None, progress: bool = True) -> TrainResult:
    """Fine-tune ``pipe.transformer`` (loaded from ``settings.pretrained`` unless given) on the instance
    images; write the adapter, samples and checkpoints under ``settings.output_dir``.

    A given ``pipe`` is changed in place: its transformer keeps the trained adapter. A pipeline on the
    CPU trains there; otherwise Accelerate picks the device (and the processes, under
    ``accelerate launch``).
    """
    from accelerate.utils import set_seed

    settings.validate()
    start_time = time.perf_counter()
    list_images(settings.instance_data)  # fail on bad data before loading a model
    out = Path(settings.output_dir).expanduser()
    resume_dir = find_resume_folder(settings.resume, out)
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = _accelerator(
        settings.mixed_precision, multi_cpu or (pipe is not None and pipe.device.type == "cpu")
    )
    set_seed(settings.seed)
    device = accelerator.device
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if pipe is None:
        pipe = load_pipeline(
            settings.pretrained,
            settings.weight_dtype(),
            settings.variant,
            str(device),
            settings.local_files_only,
        )
    else:
        pipe.to(device)
    vae = getattr(pipe, "vae", None)  # pixel-space models (the testbed) have none
    if vae is not None and vae.dtype != torch.float32:
        vae.to(torch.float32)  # small; half-precision VAEs overflow (PixArt-Σ uses SDXL's)
    pipe.set_progress_bar_config(disable=True)
    spec = spec_for(pipe)
    settings = settings.resolved(pipe.transformer, spec.target_modules)  # num_atoms="parity" → a count
    resolution = settings.resolution or spec.native_resolution
    spec.check_resolution(resolution)

    data = prepare_data(settings, pipe, spec, accelerator, out, resolution, progress)
    with text_encoders_parked(pipe, accelerator.device.type != "cpu"):
        return _fit(
            settings, pipe, spec, accelerator, data, out, resume_dir, resolution, progress, start_time
        )


@contextmanager
def text_encoders_parked(pipe, park: bool) -> Iterator[None]:
    """Every text encoder of ``pipe`` on the CPU and out of the pipeline while training runs.

    The prompts are encoded before training, so the encoders only take accelerator memory (Flux's
    T5-XXL alone is ~9 GB; SD3 has three encoders). They leave the pipeline too, not just the
    device, because diffusers picks a pipeline's device from its modules. Back where they were after.
    """
    names = [n for n in pipe.components if n.startswith("text_encoder") and getattr(pipe, n) is not None]
    parked = {n: getattr(pipe, n) for n in names} if park else {}
    devices = {n: next(m.parameters()).device for n, m in parked.items()}
    for name, encoder in parked.items():
        setattr(pipe, name, None)
        encoder.to("cpu")
    try:
        yield
    finally:
        for name, encoder in parked.items():
            setattr(pipe, name, encoder.to(devices[name]))


def _fit(
    settings, pipe, spec, accelerator, data: TrainingData, out, resume_dir, resolution, progress, start_time
):
    """The training loop proper: ``train`` has loaded the model and encoded the data."""
    device, main = accelerator.device, accelerator.is_main_process
    pretrained = pipeline_name(pipe)
    base_dtype = pipe.transformer.dtype
    torch.manual_seed(settings.seed)  # adapter initialisation
    tuned = apply_method(
        pipe.transformer, settings.method_config(), pretrained, target_modules=spec.target_modules
    )
    if settings.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    pipe.transformer.train()
    params = tuned.trainable_parameters()
    optimizer = _optimizer(settings, params)
    model, optimizer = accelerator.prepare(pipe.transformer, optimizer)

    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + accelerator.process_index)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(data.num_instance / (settings.batch_size * world))
    total = settings.max_steps or settings.epochs * steps_per_epoch
    tuned.start_training(total, settings.seed)  # atoms with a budget: the cuts' schedule
    start_step, history = 0, []
    if resume_dir is not None:
        start_step, history = load_checkpoint(
            resume_dir, settings, tuned, optimizer, generator, accelerator.process_index, total
        )

    samples: list[Path] = []
    checkpoints: list[Path] = []
    bar = progress_bar(
        total=total, initial=start_step, desc=f"train {settings.method}", disable=not (progress and main)
    )
    for step in range(start_step + 1, total + 1):
        index = _batch_indices(step, data.num_instance, settings.batch_size, world, rank, settings.seed)
        mean, std = data.instance[0][index], data.instance[1][index]
        prompt_ids = [data.instance_prompt_ids[i] for i in index.tolist()]
        prompts = data.prompts.select(prompt_ids)
        if data.class_images is not None:
            cindex = torch.randint(0, len(data.class_paths), (len(index),), generator=generator)
            mean = torch.cat([mean, data.class_images[0][cindex]])
            std = torch.cat([std, data.class_images[1][cindex]])
            prompts = data.prompts.select(prompt_ids + [data.class_prompt_ids[i] for i in cindex.tolist()])
        eps = torch.randn(mean.shape, generator=generator)
        latents = spec.latents(mean, std, eps)
        noise = torch.randn(latents.shape, generator=generator)
        noised = spec.add_noise(latents.to(device), noise.to(device), generator)  # the host's objective
        cond = prompts.to(device, base_dtype)
        with accelerator.autocast():
            pred = spec.predict_noise(model, noised.noisy.to(base_dtype), noised.timesteps, cond)
        n = len(index)
        loss = noised.loss(pred, slice(None, n))
        record: dict[str, float] = {"step": step}
        if data.class_images is not None:
            prior = noised.loss(pred, slice(n, None))
            record["instance"], record["prior"] = loss.item(), prior.item()
            loss = loss + settings.prior_loss_weight * prior
        reg, terms = tuned.regularization()
        total_loss = loss if reg is None else loss + reg
        accelerator.backward(total_loss)
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_factor = tuned.after_step(step)  # an atom budget's cut raises the rate for the survivors
        if lr_factor is not None:
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * lr_factor
        record.update(loss=loss.item(), total=total_loss.item(), **terms)
        history.append(record)
        bar.update(1)
        bar.set_postfix(_postfix(record))
        if settings.sample_every and step % settings.sample_every == 0 and main:
            samples.append(
                _sample(pipe, spec, accelerator, data, settings, resolution, out / "samples", step)
            )
        if settings.checkpoint_every and step % settings.checkpoint_every == 0:
            states = generator_states(accelerator, generator)  # every process's, for an exact resume
            if main:
                checkpoints.append(save_checkpoint(out, step, settings, tuned, optimizer, states, history))
            accelerator.wait_for_everyone()
    bar.close()
    tuned.finish_training()  # atoms with a budget: pruned to the atoms kept
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # the pipeline's transformer, as it was
    pipe.transformer.eval()
    if settings.gradient_checkpointing:
        pipe.transformer.disable_gradient_checkpointing()
    adapter_dir = out / "adapter"
    seconds = time.perf_counter() - start_time
    if main:
        summary = training_record(
            settings,
            pretrained,
            resolution,
            total,
            history,
            data.num_instance,
            len(data.class_paths),
            tuned,
            seconds,
            captioned=data.captioned,
        )
        tuned.save(adapter_dir)
        save_json(summary, adapter_dir / "training.json")
        save_text(model_card(summary, tuned), adapter_dir / "README.md")
        save_json(history, out / "history.json")
    return TrainResult(
        out, adapter_dir, total, history, samples, checkpoints, data.class_paths, seconds, tuned, main
    )


def _accelerator(mixed_precision: str, cpu: bool = False):
    """An ``Accelerator`` (on the CPU when asked); in a single process, a new precision or device
    replaces those of an earlier run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    changed = shared and (shared.get("_mixed_precision") != mixed_precision or shared.get("_cpu") != cpu)
    if changed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise AtomtuneError(f"mixed precision {mixed_precision!r} is not available here: {exc}") from exc


def _optimizer(settings: TrainSettings, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "came":
        from came_pytorch import CAME

        return CAME(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _batch_indices(step: int, n: int, batch: int, world: int, rank: int, seed: int) -> torch.Tensor:
    """This process's images for ``step`` (1-based): a fresh permutation per epoch, full batches."""
    per_step = batch * world
    steps_per_epoch = math.ceil(n / per_step)
    epoch, i = divmod(step - 1, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    start = i * per_step + rank * batch
    return perm[torch.arange(start, start + batch) % n]


def _postfix(record: dict[str, float]) -> dict[str, str]:
    out = {"loss": f"{record['loss']:.4f}"}
    if "zero_share" in record:  # atoms: true sparsity first, then the penalties' values
        out["zeros"] = f"{record['zero_share']:.0%}"
        out["active/token"] = f"{record['active_per_token']:.1f}"
        out["l1"] = f"{record['l1']:.3g}"
    return out


def _sample(pipe, spec, accelerator, data: TrainingData, settings, resolution, folder, step) -> Path:
    pipe.transformer.eval()
    with torch.no_grad(), accelerator.autocast():
        images = [
            spec.generate(
                data.sampling.select([i]),
                data.negative,
                settings.seed + i,
                settings.sample_steps,
                settings.guidance_scale,
                resolution,
                resolution,
            )
            for i in range(len(data.sampling))
        ]
    pipe.transformer.train()
    return save_png(grid([images]), folder / f"step-{step:06d}.png")


# -- checkpoints --------------------------------------------------------------------------------
