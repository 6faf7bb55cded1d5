"""``FlowMatchingSpec``: what SD3/SD3.5, Flux and Sana share as the workflows see them — rectified-flow
training with diffusers' own helpers, VAE latents with a shift and a scale, the sampler's timesteps.

Training follows diffusers' DreamBooth LoRA scripts for these hosts (``train_dreambooth_lora_sd3.py``,
``_flux.py``, ``_sana.py``): a ``FlowMatchEulerDiscreteScheduler`` made from the pipeline's scheduler
config; ``u`` drawn by ``compute_density_for_timestep_sampling`` (SD3: ``logit_normal``; Flux and
Sana: ``none``, uniform); the timestep and sigma at index ``u · num_train_timesteps`` of that
scheduler; ``x_t = (1 - σ)·x_0 + σ·ε``; target ``ε - x_0``; per-sample weights from
``compute_loss_weighting_for_sd3``. A host's spec adds its prompts, its transformer call and its
sampler (``atomtune.diffusion.sd3``, ``flux``, ``sana``).
"""

from __future__ import annotations

import inspect

import torch

from atomtune.diffusion.spec import Noised, PixArtSpec, Prompts
from atomtune.errors import AtomtuneError


class FlowMatchingSpec(PixArtSpec):
    """Shared by the flow-matching hosts; subclasses set the class attributes and the host calls."""

    #: ``compute_density_for_timestep_sampling``'s scheme, as the host's DreamBooth script defaults it
    weighting_scheme = "none"
    logit_mean, logit_std, mode_scale = 0.0, 1.0, 1.29
    #: the side an image must be a multiple of, in latent pixels (Flux packs 2x2 latent patches)
    latent_multiple = 1

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.vae_scale_factor = pipe.vae_scale_factor
        self.patch_size = getattr(pipe.transformer.config, "patch_size", 1) or 1
        self.native_resolution = self.default_sample_size() * self.vae_scale_factor
        self._train_scheduler = None

    def default_sample_size(self) -> int:
        """The latent side the pipeline draws at by default."""
        return int(
            getattr(self.pipe, "default_sample_size", None) or self.pipe.transformer.config.sample_size
        )

    def check_resolution(self, height: int, width: int | None = None) -> None:
        multiple = self.vae_scale_factor * self.patch_size * self.latent_multiple
        for side in (height, width if width is not None else height):
            if side < multiple or side % multiple:
                raise AtomtuneError(
                    f"image size {side} must be a positive multiple of {multiple} for this model "
                    f"(VAE factor {self.vae_scale_factor} x patch {self.patch_size * self.latent_multiple})"
                )

    def text_device(self) -> torch.device:
        encoder = getattr(self.pipe, "text_encoder", None)
        if encoder is None:
            raise AtomtuneError("this pipeline has no text encoder loaded")
        return encoder.device

    # -- training -------------------------------------------------------------------------------
    def training_scheduler(self):
        """The scheduler training draws from: flow matching on the pipeline's scheduler config (as the
        DreamBooth scripts do, whatever class the pipeline samples with)."""
        if self._train_scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            known = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
            config = {k: v for k, v in self.pipe.scheduler.config.items() if k in known}  # Sana: DPM's
            self._train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        return self._train_scheduler

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> Noised:
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        scheduler = self.training_scheduler()
        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=latents.shape[0],
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        index = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[index].to(latents.device)
        shape = (-1,) + (1,) * (latents.ndim - 1)
        sigmas = scheduler.sigmas[index].to(latents.device, latents.dtype).reshape(shape)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weight = compute_loss_weighting_for_sd3(weighting_scheme=self.weighting_scheme, sigmas=sigmas)
        return Noised(noisy, timesteps, noise - latents, weight)

    # -- sampling -------------------------------------------------------------------------------
    def initial_noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        """The sampler's starting latents (1, C, h, w), drawn on the CPU so a seed means one image."""
        channels = self.pipe.transformer.config.in_channels // (self.latent_multiple**2)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return torch.randn((1, channels, *size), generator=generator)

    def on_device(self, prompts: Prompts) -> Prompts:
        return prompts.to(self.pipe.transformer.device, self.pipe.transformer.dtype)
