"""One trainer for atoms, LoRA, DoRA and OFT: DreamBooth-style concept customization of a DiT.

The loss is the diffusion loss on the instance images with the instance prompt ("a sks dog"), plus,
with a class prompt, the same loss on class images of the base model (prior preservation), plus the
method's own regularization (atoms: L1 on the coefficients and orthogonality of the atoms). The
paper's defaults: CAME, lr 1e-4, 15 epochs. Accelerate places the model, runs bf16/fp16 autocast and
several GPUs; prompts and images are encoded once, so the text encoder can leave the GPU.

Every random draw of the loop (batch order, latent samples, noise, timesteps) comes from one torch
generator whose state is saved in each checkpoint with the adapter and the optimizer state, so
``resume`` continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import AtomtuneError
from ..progress import progress_bar
from ..validation import check_number, check_output_not_input, check_seed, check_tensor
from .data import (
    CAPTIONS,
    check_prompts,
    list_images,
    load_images,
    open_image,
    read_captions,
    square_crop,
    to_tensor,
)
from .images import grid, save_json, save_png, save_text
from .methods import DEFAULT_ATOM_BUDGET, DEFAULT_NUM_ATOMS, MethodConfig, Tuned, apply_method
from .pipeline import DEFAULT_PRETRAINED, PixArtSpec, Prompts, load_pipeline, pipeline_name, spec_for

OPTIMIZERS = ("came", "adamw")
PRECISIONS = ("no", "bf16", "fp16")
#: settings that fix the adapter's shape: a checkpoint only resumes into the same ones
STRUCTURE = ("method", "num_atoms", "atom_budget", "rank", "oft_r", "atoms")
GENERATOR = "loop_generator"  # the loop's RNG state, kept with the trained tensors in a checkpoint


@dataclass
class TrainSettings:
    """Everything ``atomtune train`` takes, as flags or as a YAML/TOML settings file."""

    instance_data: str = ""
    instance_prompt: str = ""
    output_dir: str = ""
    pretrained: str = DEFAULT_PRETRAINED
    variant: str | None = None
    dtype: str = "auto"
    local_files_only: bool = False
    token: str | None = "sks"
    class_prompt: str | None = None
    class_data: str | None = None
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    method: str = "atoms"
    num_atoms: int = DEFAULT_NUM_ATOMS
    atom_budget: int = DEFAULT_ATOM_BUDGET
    rank: int = 16
    oft_r: int = 4
    atoms: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "came"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 15
    max_steps: int | None = None
    batch_size: int = 1
    resolution: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    guidance_scale: float = 4.5
    checkpoint_every: int = 0
    checkpoints_total_limit: int = 3  # checkpoints kept (the newest); 0 keeps every one
    resume: str | None = None

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, settings_file: str | Path | None = None, **overrides: Any) -> TrainSettings:
        """Defaults < settings file < ``overrides`` (the flags given on the command line)."""
        values = read_settings_file(settings_file) if settings_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AtomtuneError(
                f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        settings = cls(**data)
        settings.validate()
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name in ("instance_data", "instance_prompt", "output_dir"):
            if not getattr(self, name):
                raise AtomtuneError(f"{name.replace('_', '-')} is required")
        _check_type("sample_prompts", self.sample_prompts, list)
        _check_type("atoms", self.atoms, dict)
        for name in ("epochs", "batch_size", "num_class_images", "sample_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("max_steps", "resolution"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("sample_every", "checkpoint_every", "checkpoints_total_limit"):
            check_number(name, getattr(self, name), integer=True, minimum=0)
        check_seed("seed", self.seed)
        for name in ("prior_loss_weight", "guidance_scale", "weight_decay", "max_grad_norm"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("learning_rate", self.learning_rate, above=0)
        for name in ("instance_data", "instance_prompt", "output_dir", "pretrained", "dtype", "method"):
            _check_type(name, getattr(self, name), str)
        for name in ("variant", "token", "class_prompt", "class_data", "resume"):
            if getattr(self, name) is not None:
                _check_type(name, getattr(self, name), str)
        if not all(isinstance(p, str) for p in self.sample_prompts):
            raise AtomtuneError(f"sample_prompts must be a list of strings, got {self.sample_prompts!r}")
        check_output_not_input(self.output_dir, (self.instance_data,), "output_dir")
        if self.optimizer not in OPTIMIZERS:
            raise AtomtuneError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.mixed_precision not in PRECISIONS:
            raise AtomtuneError(
                f"mixed_precision must be one of {', '.join(PRECISIONS)}; got {self.mixed_precision!r}"
            )
        self.method_config()
        check_prompts(self.instance_prompt, self.token, self.class_prompt)

    def method_config(self) -> MethodConfig:
        return MethodConfig(
            self.method, self.num_atoms, self.rank, self.oft_r, dict(self.atoms), self.atom_budget
        )

    def structure(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in STRUCTURE}


def _check_type(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise AtomtuneError(f"{name} must be a {kind.__name__}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AtomtuneError(f"{name} must be a positive integer, got {value!r}")


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or TOML (``.toml``) file holding one table of settings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AtomtuneError(f"settings file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AtomtuneError(
            f"settings file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AtomtuneError(f"{path} is not valid YAML: {exc}") from exc
    elif suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AtomtuneError(f"{path} is not valid TOML: {exc}") from exc
    else:
        raise AtomtuneError(f"settings file must end in .yaml, .yml or .toml: {path}")
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise AtomtuneError(f"{path} must hold a table of settings (key: value)")
    return data


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
    resume_dir = _resume_dir(settings.resume, out)
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
            _weight_dtype(settings),
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
    resolution = settings.resolution or spec.native_resolution
    spec.check_resolution(resolution)

    data = _prepare_data(settings, pipe, spec, accelerator, out, resolution, progress)
    text_encoder = pipe.text_encoder
    if accelerator.device.type != "cpu":  # prompts are encoded: the text encoder leaves the GPU
        pipe.text_encoder = None
        text_encoder.to("cpu")
    try:
        return _fit(
            settings, pipe, spec, accelerator, data, out, resume_dir, resolution, progress, start_time
        )
    finally:
        if pipe.text_encoder is None:
            pipe.text_encoder = text_encoder.to(accelerator.device)


@dataclass
class _Data:
    """Everything the loop reads, encoded once: prompts, and VAE posteriors of the images."""

    prompts: Prompts  # the instance prompt, then the class prompt(s) with prior preservation
    instance: tuple[torch.Tensor, torch.Tensor]  # posterior mean and std, (N, C, h, w) each
    class_images: tuple[torch.Tensor, torch.Tensor] | None
    class_paths: list[Path]
    class_prompt_ids: list[int]  # each class image's row in ``prompts``
    sampling: Prompts | None
    negative: Prompts | None

    @property
    def num_instance(self) -> int:
        return self.instance[0].shape[0]


def _prepare_data(
    settings, pipe, spec: PixArtSpec, accelerator, out: Path, resolution: int, progress
) -> _Data:
    class_paths: list[Path] = []
    class_images = None
    texts = [settings.instance_prompt]
    class_prompt_ids: list[int] = []
    if settings.class_prompt or settings.class_data:
        class_dir = Path(settings.class_data).expanduser() if settings.class_data else out / "class_images"
        if accelerator.is_main_process and settings.class_prompt:
            ensure_class_images(
                pipe,
                spec,
                class_dir,
                settings.class_prompt,
                settings.num_class_images,
                resolution,
                settings.seed,
                settings.sample_steps,
                settings.guidance_scale,
                progress,
            )
        accelerator.wait_for_everyone()
        class_paths = list_images(class_dir, "class images")[: settings.num_class_images]
        captions = read_captions(class_dir, class_paths)  # each image's own caption, if the folder has them
        if captions is None and not settings.class_prompt:
            raise AtomtuneError(
                f"class images in {class_dir} need a class-prompt or a {CAPTIONS} of captions"
            )
        texts += captions or [settings.class_prompt]
        class_prompt_ids = list(range(1, 1 + len(class_paths))) if captions else [1] * len(class_paths)
        pixels = torch.stack([to_tensor(square_crop(open_image(p), resolution)) for p in class_paths])
        class_images = _encode_images(spec, pixels, settings.batch_size)
    instance = _encode_images(spec, load_images(settings.instance_data, resolution), settings.batch_size)
    sampling = negative = None
    if settings.sample_every:
        sampling = spec.encode_prompts(list(settings.sample_prompts) or [settings.instance_prompt])
        negative = spec.encode_prompts([""])
    encoded = spec.encode_prompts(texts)
    return _Data(encoded, instance, class_images, class_paths, class_prompt_ids, sampling, negative)


def _fit(settings, pipe, spec, accelerator, data: _Data, out, resume_dir, resolution, progress, start_time):
    """The training loop proper: ``train`` has loaded the model and encoded the data."""
    device, main = accelerator.device, accelerator.is_main_process
    pretrained = pipeline_name(pipe)
    base_dtype = pipe.transformer.dtype
    torch.manual_seed(settings.seed)  # adapter initialisation
    tuned = apply_method(pipe.transformer, settings.method_config(), pretrained)
    if settings.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    pipe.transformer.train()
    params = tuned.trainable_parameters()
    optimizer = _optimizer(settings, params)
    model, optimizer = accelerator.prepare(pipe.transformer, optimizer)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + accelerator.process_index)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(data.num_instance / (settings.batch_size * world))
    total = settings.max_steps or settings.epochs * steps_per_epoch
    tuned.start_training(total, settings.seed)  # atoms with a budget: the cuts' schedule
    start_step, history = 0, []
    if resume_dir is not None:
        start_step, history = _load_checkpoint(
            resume_dir, settings, tuned, optimizer, generator, accelerator.process_index
        )

    samples: list[Path] = []
    checkpoints: list[Path] = []
    bar = progress_bar(
        total=total, initial=start_step, desc=f"train {settings.method}", disable=not (progress and main)
    )
    for step in range(start_step + 1, total + 1):
        index = _batch_indices(step, data.num_instance, settings.batch_size, world, rank, settings.seed)
        mean, std = data.instance[0][index], data.instance[1][index]
        prompts = data.prompts.select([0] * len(index))
        if data.class_images is not None:
            cindex = torch.randint(0, len(data.class_paths), (len(index),), generator=generator)
            mean = torch.cat([mean, data.class_images[0][cindex]])
            std = torch.cat([std, data.class_images[1][cindex]])
            prompts = data.prompts.select(
                [0] * len(index) + [data.class_prompt_ids[i] for i in cindex.tolist()]
            )
        eps = torch.randn(mean.shape, generator=generator)
        latents = spec.latents(mean, std, eps)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        cond = Prompts(prompts.embeds.to(device, base_dtype), prompts.mask.to(device))
        with accelerator.autocast():
            pred = spec.predict_noise(model, noisy.to(base_dtype), timesteps, cond)
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        pred, target = pred.float(), target.float()
        n = len(index)
        loss = F.mse_loss(pred[:n], target[:n])
        record: dict[str, float] = {"step": step}
        if data.class_images is not None:
            prior = F.mse_loss(pred[n:], target[n:])
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
            states = _generator_states(accelerator, generator)  # every process's, for an exact resume
            if main:
                checkpoints.append(_save_checkpoint(out, step, settings, tuned, optimizer, states, history))
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
        summary = _training_record(
            settings,
            pretrained,
            resolution,
            total,
            history,
            data.num_instance,
            len(data.class_paths),
            tuned,
            seconds,
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


def _weight_dtype(settings: TrainSettings) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[settings.mixed_precision]


def _optimizer(settings: TrainSettings, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "came":
        from came_pytorch import CAME

        return CAME(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def _encode_images(spec: PixArtSpec, pixels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(max(batch, 4)):
        m, s = spec.encode_images(chunk)
        means.append(m)
        stds.append(s)
    return torch.cat(means), torch.cat(stds)


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


def ensure_class_images(
    pipe,
    spec: PixArtSpec,
    folder: Path,
    prompt: str,
    count: int,
    resolution: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    progress: bool = True,
) -> list[Path]:
    """Top ``folder`` up to ``count`` class images generated by the base model (prior preservation)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    missing = count - len(existing)
    if missing > 0:
        encoded, negative = spec.encode_prompts([prompt]), spec.encode_prompts([""])
        for i in progress_bar(range(missing), desc="class images", disable=not progress):
            number = len(existing) + i
            image = spec.generate(
                encoded, negative, seed + 100_000 + number, steps, guidance_scale, resolution, resolution
            )
            save_png(image, folder / f"class-{number:05d}.png")
    return list_images(folder, "class images")[:count]


def _sample(pipe, spec, accelerator, data: _Data, settings, resolution, folder, step) -> Path:
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
def _resume_dir(resume: str | None, out: Path) -> Path | None:
    from ..checkpoint import STATE_JSON, latest_checkpoint

    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
        if found is None:
            print(
                f"atomtune: note: no checkpoint in {out / 'checkpoints'}; starting at step 0", file=sys.stderr
            )
        return found
    path = Path(resume).expanduser()
    if not (path / STATE_JSON).is_file():
        raise AtomtuneError(f"not a checkpoint folder (no {STATE_JSON}): {path}")
    return path


def _trainable(tuned: Tuned) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in tuned.model.named_parameters() if p.requires_grad}


def _generator_states(accelerator, generator: torch.Generator) -> list[torch.Tensor]:
    state = generator.get_state()
    if accelerator.num_processes == 1:
        return [state]
    gathered = accelerator.gather(state.to(accelerator.device)[None]).cpu()
    return list(gathered.unbind(0))


def _save_checkpoint(out, step, settings, tuned, optimizer, generator_states, history) -> Path:
    """Trained tensors, optimizer and RNG states, step (``atomtune.checkpoint``, safetensors), plus a
    copy of the adapter as it stands, usable with ``generate``."""
    from ..checkpoint import prune_checkpoints, save_training_state

    folder = out / "checkpoints" / f"checkpoint-{step:06d}"
    tensors = {**_trainable(tuned), **tuned.training_state()}
    tensors.update({f"{GENERATOR}.{rank}": state for rank, state in enumerate(generator_states)})
    extra = {"structure": settings.structure(), "atomtune_version": __version__, "history": history}
    save_training_state(folder, tensors, optimizer, step, extra)
    tuned.save(folder / "adapter")
    prune_checkpoints(folder.parent, settings.checkpoints_total_limit, newest=folder)  # after it is whole
    return folder


def _load_checkpoint(path: Path, settings: TrainSettings, tuned: Tuned, optimizer, generator, rank: int):
    import json

    from ..checkpoint import STATE_JSON, load_training_state

    try:
        structure = json.loads((path / STATE_JSON).read_text())["extra"]["structure"]
        if not isinstance(structure, dict):
            raise TypeError(f"extra.structure is a {type(structure).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise AtomtuneError(f"{path} is not a checkpoint of atomtune train ({exc})") from exc
    for key, value in structure.items():
        if getattr(settings, key, None) != value:
            raise AtomtuneError(
                f"checkpoint {path} was made with {key}={value!r}; this run asks for {getattr(settings, key)!r}"
            )
    trainable = _trainable(tuned)
    tensors, step, extra = load_training_state(path, optimizer)
    states = {k: v for k, v in tensors.items() if k.startswith(GENERATOR + ".")}
    if not set(trainable) <= set(tensors):
        raise AtomtuneError(f"checkpoint {path} does not hold this adapter's tensors")
    try:  # the rest belongs to the method (an atom budget's masks); it refuses what it does not know
        tuned.load_training_state(
            {k: v for k, v in tensors.items() if k not in trainable and k not in states}
        )
    except AtomtuneError as exc:
        raise AtomtuneError(f"checkpoint {path}: {exc}") from exc
    if f"{GENERATOR}.{rank}" not in states:
        raise AtomtuneError(
            f"checkpoint {path} was written by {len(states)} process(es); this is process {rank}"
        )
    for name, p in trainable.items():
        check_tensor(tensors[name], f"checkpoint {path}: model.{name}", tuple(p.shape), (p.dtype,))
    state = tensors[f"{GENERATOR}.{rank}"]
    check_tensor(state, f"checkpoint {path}: {GENERATOR}.{rank}", generator.get_state().shape, (torch.uint8,))
    history = extra.get("history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise AtomtuneError(f"checkpoint {path}: extra.history must be a list of records")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])
    generator.set_state(state)
    return int(step), list(history)


# -- what is written with the adapter -----------------------------------------------------------
def _training_record(settings, pretrained, resolution, steps, history, n_instance, n_class, tuned, seconds):
    return {
        "atomtune_version": __version__,
        "base_model": pretrained,
        "method": settings.method,
        "method_description": settings.method_config().describe(),
        "trainable_parameters": tuned.num_trainable_parameters(),
        "instance_data": str(settings.instance_data),
        "instance_images": n_instance,
        "instance_prompt": settings.instance_prompt,
        "token": settings.token,
        "class_prompt": settings.class_prompt,
        "class_images": n_class,
        "resolution": resolution,
        "steps": steps,
        "final_loss": history[-1]["loss"] if history else None,
        "sparsity": _final_sparsity(history, tuned),
        "seconds": round(seconds, 2),
        "settings": settings.to_dict(),
    }


def _final_sparsity(history: list[dict[str, float]], tuned: Tuned) -> dict[str, float] | None:
    """Atoms: true sparsity over the last tenth of training (share of zero coefficients, live atoms
    active per token) and the live atoms per module the saved adapter keeps."""
    tail = [h for h in history[-max(1, len(history) // 10) :] if "zero_share" in h]
    live = tuned.live_atoms()
    if not tail or not live:
        return None
    return {
        "zero_share": sum(h["zero_share"] for h in tail) / len(tail),
        "active_per_token": sum(h["active_per_token"] for h in tail) / len(tail),
        "live_atoms_per_module": sum(live.values()) / len(live),
    }


def model_card(record: dict[str, Any], tuned: Tuned) -> str:
    s = record["settings"]
    if record["class_images"]:
        of = f'"{record["class_prompt"]}"' if record["class_prompt"] else "their own captions"
        prior = (
            f"prior preservation with {record['class_images']} class images of "
            f"{of} (weight {s['prior_loss_weight']})"
        )
    else:
        prior = "no prior preservation"
    return f"""# {record["method"]} adapter for {record["base_model"]}

Trained with atomtune {record["atomtune_version"]}: DreamBooth-style concept customization.

- Base model: `{record["base_model"]}` ({type(tuned.model).__name__})
- Method: {record["method_description"]}
- Trainable parameters: {record["trainable_parameters"]:,}
- Data: {record["instance_images"]} images from `{record["instance_data"]}`, prompt "{record["instance_prompt"]}"
- Prior: {prior}
- Optimizer: {s["optimizer"].upper()}, lr {s["learning_rate"]}, weight decay {s["weight_decay"]}
- Schedule: {record["steps"]} steps ({s["epochs"]} epochs, batch {s["batch_size"]}), seed {s["seed"]}
- Resolution {record["resolution"]}, mixed precision {s["mixed_precision"]}
- Final diffusion loss: {_fmt(record["final_loss"])}{_sparsity_line(record.get("sparsity"))}

Use it:

```
atomtune generate --pretrained {record["base_model"]} --adapter ADAPTER_DIR --prompt "{record["instance_prompt"]}"
```

All settings are in `training.json`. The adapter's files: `adapter_config.json` and
`adapter_model.safetensors` ({"atomtune's format" if record["method"] == "atoms" else "PEFT's format"}),
`atomtune.json` (method, base model and the shapes the adapter needs).
"""


def _sparsity_line(sparsity: dict[str, float] | None) -> str:
    if not sparsity:
        return ""
    return (
        f"\n- Atoms: {sparsity['live_atoms_per_module']:.1f} live per module; "
        f"{sparsity['zero_share']:.0%} of the coefficients are zero, "
        f"{sparsity['active_per_token']:.1f} atoms active per token (last tenth of training)"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
