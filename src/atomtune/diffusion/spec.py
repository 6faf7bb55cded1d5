"""``PixArtSpec``: all the workflows know about a diffusion transformer — how to encode prompts, turn
images into latents, noise them for training (and the target the model learns), call the
transformer for a prediction and run the sampler.

Another DiT needs another spec of the same shape, nothing else: ``register_spec`` maps a pipeline
class to its spec (SD3, Flux and Sana register theirs from ``atomtune.diffusion.sd3`` etc.), or the
pipeline class names its own as ``atomtune_spec`` (the testbed's ``DigitPipeline`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atomtune.errors import AtomtuneError

_SPECS: dict[str, type] = {}  # pipeline class name -> its spec


@dataclass
class Prompts:
    """Encoded prompts: text embeddings (P, L, C), their attention mask (P, L) and, for hosts that
    take one (SD3, Flux), the pooled embedding (P, C')."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> Prompts:
        index = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)
        pooled = None if self.pooled is None else self.pooled[index.to(self.pooled.device)]
        return Prompts(self.embeds[index], self.mask[index.to(self.mask.device)], pooled)

    def to(self, device, dtype: torch.dtype) -> Prompts:
        """On ``device``, the embeddings in ``dtype`` (the mask keeps its own)."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Prompts(self.embeds.to(device, dtype), self.mask.to(device), pooled)


@dataclass
class Noised:
    """One training batch noised: the model's input, its timesteps, the target it should predict, and
    a per-sample loss weight (``None``: plain mean squared error)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None

    def loss(self, pred: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The (weighted) mean squared error of ``pred`` on the batch rows ``rows``, in float32."""
        pred, target = pred[rows].float(), self.target[rows].float()
        if self.weight is None:
            return F.mse_loss(pred, target)
        weight = self.weight[rows].float()
        return (weight * (pred - target) ** 2).reshape(len(pred), -1).mean(1).mean()


class PixArtSpec:
    """PixArt-α and PixArt-Σ (``PixArtTransformer2DModel``): everything model-specific, in one place."""

    #: modules the PEFT baselines adapt; atoms adapt the attention modules holding them
    target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        transformer = pipe.transformer
        self.alpha = type(pipe).__name__ == "PixArtAlphaPipeline"
        self.max_sequence_length = 120 if self.alpha else 300
        if pipe.text_encoder is not None and hasattr(pipe.tokenizer, "model_max_length"):
            self.max_sequence_length = min(self.max_sequence_length, pipe.tokenizer.model_max_length)
        self.vae_scale_factor = pipe.vae_scale_factor
        self.patch_size = transformer.config.patch_size
        self.use_additional_conditions = bool(getattr(transformer, "use_additional_conditions", False))
        self.native_resolution = transformer.config.sample_size * self.vae_scale_factor

    def check_resolution(self, height: int, width: int | None = None) -> None:
        multiple = self.vae_scale_factor * self.patch_size
        for side in (height, width if width is not None else height):
            if side < multiple or side % multiple:
                raise AtomtuneError(
                    f"image size {side} must be a positive multiple of {multiple} for this model "
                    f"(VAE factor {self.vae_scale_factor} x patch {self.patch_size})"
                )

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of the image tokens an image of this size becomes, in the transformer's
        row-major token order: latent pixels per token = VAE factor x patch (x 2 where latents are
        packed into 2x2 patches, as in Flux)."""
        side = self.vae_scale_factor * self.patch_size * getattr(self, "latent_multiple", 1)
        return height // side, width // side

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        if self.pipe.text_encoder is None:
            raise AtomtuneError("this pipeline has no text encoder loaded")
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        return Prompts(embeds, mask)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) → the VAE posterior's mean and std (sample latents from them)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean.float().cpu(), dist.std.float().cpu()

    def latents(self, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mean + std * eps - shift) * config.scaling_factor

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Noised:
        """DDPM training: uniform timesteps (drawn on the CPU from ``generator``), the scheduler's
        noising, and the noise (or velocity) as the target."""
        from diffusers import DDPMScheduler

        if getattr(self, "_ddpm", None) is None:
            self._ddpm = DDPMScheduler.from_config(self.pipe.scheduler.config)
        scheduler = self._ddpm
        count = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            return Noised(noisy, timesteps, noise)
        return Noised(noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps))

    def predict_noise(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: Prompts
    ) -> torch.Tensor:
        """The transformer's noise (or velocity) prediction, learned-sigma channels dropped."""
        batch = noisy.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if self.use_additional_conditions:
            h, w = (s * self.vae_scale_factor for s in noisy.shape[-2:])
            added = {
                "resolution": torch.tensor([[h, w]], dtype=noisy.dtype, device=noisy.device).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=noisy.dtype, device=noisy.device).repeat(
                    batch, 1
                ),
            }
        out = model(
            noisy,
            encoder_hidden_states=prompts.embeds,
            encoder_attention_mask=prompts.mask,
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * noisy.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt: Prompts,
        negative: Prompts,
        seed: int,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
    ):
        """One image (PIL) for one encoded prompt and seed."""
        self.check_resolution(height, width)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn(
            (
                1,
                self.pipe.transformer.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            ),
            generator=generator,
        )
        device, dtype = self.pipe.transformer.device, self.pipe.transformer.dtype
        out = self.pipe(
            negative_prompt=None,
            prompt_embeds=prompt.embeds.to(device, dtype),
            prompt_attention_mask=prompt.mask.to(device),
            negative_prompt_embeds=negative.embeds.to(device, dtype),
            negative_prompt_attention_mask=negative.mask.to(device),
            latents=latents.to(device, dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            use_resolution_binning=False,
            max_sequence_length=self.max_sequence_length,
            clean_caption=False,
            output_type="pil",
        )
        return out.images[0]

    def timesteps(self) -> list[int]:
        """The timesteps the sampler visited in the last ``generate`` call."""
        return [int(t) for t in self.pipe.scheduler.timesteps]


def register_spec(pipeline_class: str, spec: type) -> None:
    """Let ``spec_for`` answer ``spec(pipe)`` for pipelines of the class named ``pipeline_class``."""
    _SPECS[pipeline_class] = spec


def supported_pipelines() -> list[str]:
    return sorted(_SPECS)


def spec_for(pipe) -> PixArtSpec:
    """The model-specific part for ``pipe``; a clear error for a pipeline not supported yet.

    A pipeline class may name its own spec as ``atomtune_spec`` (the testbed's ``DigitPipeline``
    does); otherwise the spec registered for its class name (``register_spec``) is used.
    """
    own = getattr(type(pipe), "atomtune_spec", None)
    if own is not None:
        return own(pipe)
    name = type(pipe).__name__
    if name not in _SPECS or not hasattr(pipe, "transformer"):
        raise AtomtuneError(
            f"{name} is not supported yet (supported: {', '.join(supported_pipelines())}); "
            f"a new diffusion transformer needs a spec like PixArtSpec (atomtune/diffusion/spec.py), "
            f"registered with register_spec"
        )
    return _SPECS[name](pipe)


register_spec("PixArtSigmaPipeline", PixArtSpec)
register_spec("PixArtAlphaPipeline", PixArtSpec)
