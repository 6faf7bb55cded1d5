"""What the loop reads, prepared once: instance and class images encoded to VAE posteriors, prompts
encoded, and the class images drawn by the base model when prior preservation asks for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from atomtune.diffusion.data import (
    CAPTIONS,
    has_token,
    load_images,
    read_captions,
    square_crop,
    to_tensor,
)
from atomtune.diffusion.spec import PixArtSpec, Prompts
from atomtune.errors import AtomtuneError
from atomtune.io import list_images, open_image, save_png
from atomtune.progress import progress_bar


@dataclass
class TrainingData:
    """Everything the loop reads, encoded once: prompts, and VAE posteriors of the images."""

    prompts: Prompts  # the instance prompt(s), then the class prompt(s) with prior preservation
    instance: tuple[torch.Tensor, torch.Tensor]  # posterior mean and std, (N, C, h, w) each
    instance_prompt_ids: list[int]  # each instance image's row in ``prompts``
    class_images: tuple[torch.Tensor, torch.Tensor] | None
    class_paths: list[Path]
    class_prompt_ids: list[int]  # each class image's row in ``prompts``
    sampling: Prompts | None
    negative: Prompts | None
    captioned: bool = False  # each instance image under its own caption

    @property
    def num_instance(self) -> int:
        return self.instance[0].shape[0]


def prepare_data(
    settings, pipe, spec: PixArtSpec, accelerator, out: Path, resolution: int, progress
) -> TrainingData:
    class_paths: list[Path] = []
    class_images = None
    instance_paths = list_images(settings.instance_data, "instance images")
    captions = instance_captions(settings, instance_paths)
    texts = list(captions or [settings.instance_prompt])
    instance_prompt_ids = list(range(len(instance_paths))) if captions else [0] * len(instance_paths)
    first_class = len(texts)
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
        class_prompt_ids = [first_class + (i if captions else 0) for i in range(len(class_paths))]
        pixels = torch.stack([to_tensor(square_crop(open_image(p), resolution)) for p in class_paths])
        class_images = encode_images(spec, pixels, settings.batch_size)
    instance = encode_images(spec, load_images(settings.instance_data, resolution), settings.batch_size)
    sampling = negative = None
    if settings.sample_every:
        sampling = spec.encode_prompts(list(settings.sample_prompts) or [settings.instance_prompt])
        negative = spec.encode_prompts([""])
    encoded = spec.encode_prompts(texts)
    return TrainingData(
        encoded,
        instance,
        instance_prompt_ids,
        class_images,
        class_paths,
        class_prompt_ids,
        sampling,
        negative,
        captioned=captions is not None,
    )


def instance_captions(settings, paths: list[Path]) -> list[str] | None:
    """Each image's own caption when the instance folder has a ``metadata.jsonl`` (else ``None``:
    the instance prompt serves every image): captions that name what varies between the photos (color, place, pose) let the
    token carry only the subject, which then composes with those words at sampling time."""
    folder = Path(settings.instance_data).expanduser()
    captions = read_captions(folder, paths) if folder.is_dir() else None
    if captions is None:
        return None
    if settings.token is not None:
        missing = [c for c in captions if not has_token(c, settings.token)]
        if missing:
            raise AtomtuneError(
                f"instance caption {missing[0]!r} in {folder / CAPTIONS} lacks the token {settings.token!r}"
            )
    return captions


def encode_images(spec: PixArtSpec, pixels: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(max(batch, 4)):
        m, s = spec.encode_images(chunk)
        means.append(m)
        stds.append(s)
    return torch.cat(means), torch.cat(stds)


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
