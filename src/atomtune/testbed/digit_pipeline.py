"""The testbed model as a diffusers pipeline, so every workflow (the one trainer, generate, atoms,
edit, merge) runs on it unchanged: ``load_pipeline("digits")``.

``DigitPipeline`` holds the pixel-space PixArt transformer, the MiniLM text encoder and tokenizer,
and a DPM-Solver++ scheduler; ``DigitSpec`` is its model-specific part (the shape of ``PixArtSpec``):
no VAE, so images are their own latents, and sampling thresholds the predicted x0 (the cosine
schedule's last steps would blow an unclipped estimate up into noise).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from atomtune.diffusion.spec import PixArtSpec, Prompts
from atomtune.testbed.digits import CANVAS
from atomtune.testbed.model import load_digit_transformer, read_metadata
from atomtune.testbed.text import MAX_LENGTH, minilm_path

NAME = "digits"


@torch.no_grad()
def sample(
    transformer, scheduler, cond: Prompts, uncond: Prompts, seeds: list[int], steps: int, guidance: float
):
    """Images in [0, 1], (B, 3, 24, 24): one per (prompt row, seed), classifier-free guidance."""
    device, dtype = transformer.device, transformer.dtype
    x = torch.stack(
        [torch.randn(3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    x = x.to(device, dtype)
    n = len(seeds)
    embeds = torch.cat([cond.embeds, uncond.embeds.expand(n, -1, -1)]).to(device, dtype)
    mask = torch.cat([cond.mask, uncond.mask.expand(n, -1)]).to(device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = transformer(
            torch.cat([x, x]),
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=torch.full((2 * n,), int(t), device=device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        out_c, out_u = out.float().chunk(2)
        x = scheduler.step(out_u + guidance * (out_c - out_u), t, x.float()).prev_sample.to(dtype)
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] → PIL images (NaN, from a diverged adapter, becomes black)."""
    from PIL import Image

    arrays = (images.nan_to_num(0.0).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


class DigitSpec(PixArtSpec):
    """Pixel space (images are the latents), MiniLM captions, 24x24 canvases."""

    def __init__(self, pipe: DigitPipeline) -> None:
        self.pipe = pipe
        self.alpha = False
        self.max_sequence_length = MAX_LENGTH
        self.vae_scale_factor = 1
        self.patch_size = pipe.transformer.config.patch_size
        self.use_additional_conditions = False
        self.native_resolution = CANVAS

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        return self.pipe.encode_prompt(list(prompts))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixels.float().cpu()
        return pixels, torch.zeros_like(pixels)

    def latents(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return mean

    @torch.no_grad()
    def generate(self, prompt, negative, seed, steps, guidance_scale, height, width):
        if (height, width) != (CANVAS, CANVAS):
            self.check_resolution(height, width)
            raise ValueError(f"the testbed model draws {CANVAS}x{CANVAS} images only")
        image = sample(
            self.pipe.transformer, self.pipe.scheduler, prompt, negative, [int(seed)], steps, guidance_scale
        )
        return to_pil(image)[0]


class DigitPipeline(DiffusionPipeline):
    """Text → 24x24 digit image with the testbed's pretrained pixel-space PixArt."""

    atomtune_spec = DigitSpec
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Prompts:
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).to(self.text_encoder.device)
        return Prompts(self.text_encoder(**batch).last_hidden_state, batch.attention_mask)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], steps: int = 20, guidance_scale: float = 3.0):
        """One image per (prompt, seed) pair, as a (B, 3, 24, 24) tensor in [0, 1]."""
        cond = self.encode_prompt(prompts)
        return sample(
            self.transformer, self.scheduler, cond, self.encode_prompt([""]), seeds, steps, guidance_scale
        )


def digit_pipeline(weights: str | Path | None = None, device: str = "cpu") -> DigitPipeline:
    """The testbed pipeline: the shipped (or given) transformer weights and MiniLM from its package."""
    from diffusers import DPMSolverMultistepScheduler
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    _, _, schedule = read_metadata(weights)
    pipe = DigitPipeline(
        transformer=load_digit_transformer(weights),
        text_encoder=AutoModel.from_pretrained(path).eval(),
        tokenizer=AutoTokenizer.from_pretrained(path),
        scheduler=DPMSolverMultistepScheduler(**schedule, thresholding=True, sample_max_value=1.0),
    )
    pipe.register_to_config(_name_or_path=NAME)
    return pipe.to(device)
