"""The hosts the speed harness measures, one small table entry each: the diffusers class and its
config at a preset's size, random inputs of the preset's shapes, and the modules LoRA adapts there.

- ``pixart``: ``PixArtTransformer2DModel`` (PixArt-α/Σ), latents 4 channels, T5 captions;
- ``sd3``: ``SD3Transformer2DModel`` as SD3.5 (RMS QK-norm, the image-only ``attn2`` in the first
  ``dual_layers`` blocks), latents 16 channels, CLIP + T5 tokens and a pooled CLIP embedding;
- ``flux``: ``FluxTransformer2DModel`` (Flux.1), 16-channel latents packed into 2x2 patches (64
  features a token) with their position ids, T5 tokens, pooled CLIP, the guidance input of dev.

LoRA's targets are the host's spec's (``diffusion.sd3.SD3Spec.target_modules`` etc.): what the
diffusers DreamBooth LoRA scripts adapt, so Flux's include the double blocks' feed-forward layers.
A preset's ``sample`` is the latent side (pixels / 8); every host turns it into (sample / 2)² image
tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from atomtune.diffusion.flux import FluxSpec
from atomtune.diffusion.sd3 import SD3Spec
from atomtune.diffusion.spec import PixArtSpec

LATENT_CHANNELS = 16  # SD3's and Flux's VAE


@dataclass(frozen=True)
class Host:
    model_class: str  # the diffusers class
    config: Callable[[dict[str, Any], int], dict[str, Any]]  # (preset, latent side) -> its arguments
    inputs: Callable[[dict[str, Any], int, int, torch.Generator], dict[str, Any]]  # float32, on the CPU
    target_modules: tuple[str, ...]  # LoRA's

    def diffusers_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.model_class)


def pixart_config(p: dict[str, Any], sample: int) -> dict[str, Any]:
    """``PixArtTransformer2DModel`` arguments at the preset's size and latent side ``sample``."""
    return {
        "num_attention_heads": p["heads"],
        "attention_head_dim": p["head_dim"],
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": p["layers"],
        "cross_attention_dim": p["heads"] * p["head_dim"],
        "sample_size": sample,
        "patch_size": 2,
        "caption_channels": p["caption"],
        "interpolation_scale": max(sample // 64, 1),
        "use_additional_conditions": False,  # as PixArt-Σ's published config
    }


def pixart_inputs(p: dict[str, Any], batch: int, sample: int, g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, 4, sample, sample, generator=g),
        "encoder_hidden_states": torch.randn(batch, p["text"], p["caption"], generator=g),
        "timestep": torch.full((batch,), 500),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def sd3_config(p: dict[str, Any], sample: int) -> dict[str, Any]:
    """SD3.5's ``SD3Transformer2DModel`` arguments (as ``stable-diffusion-3.5-medium``'s config at
    the medium preset); positions are cropped from the ``pos_embed`` grid at any resolution."""
    return {
        "sample_size": p["sample"],
        "patch_size": 2,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "num_layers": p["layers"],
        "attention_head_dim": p["head_dim"],
        "num_attention_heads": p["heads"],
        "joint_attention_dim": p["caption"],
        "caption_projection_dim": p["heads"] * p["head_dim"],
        "pooled_projection_dim": p["pooled"],
        "pos_embed_max_size": p["pos_embed"],
        "dual_attention_layers": tuple(range(p["dual_layers"])),
        "qk_norm": "rms_norm",
    }


def sd3_inputs(p: dict[str, Any], batch: int, sample: int, g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, sample, sample, generator=g),
        "encoder_hidden_states": torch.randn(batch, p["text"], p["caption"], generator=g),
        "pooled_projections": torch.randn(batch, p["pooled"], generator=g),
        "timestep": torch.full((batch,), 500.0),
    }


def flux_config(p: dict[str, Any], sample: int) -> dict[str, Any]:
    """``FluxTransformer2DModel`` arguments (Flux.1-dev's config at the dev preset)."""
    return {
        "patch_size": 1,
        "in_channels": 4 * LATENT_CHANNELS,
        "num_layers": p["layers"],
        "num_single_layers": p["single_layers"],
        "attention_head_dim": p["head_dim"],
        "num_attention_heads": p["heads"],
        "joint_attention_dim": p["caption"],
        "pooled_projection_dim": p["pooled"],
        "guidance_embeds": p["guidance"],
        "axes_dims_rope": tuple(p["rope"]),
    }


def flux_inputs(p: dict[str, Any], batch: int, sample: int, g: torch.Generator) -> dict[str, Any]:
    """Packed latents and their ids as ``FluxPipeline`` makes them: id (0, row, column) per 2x2 patch,
    zeros for the text; the timestep as σ in [0, 1]; guidance 3.5 where the model takes it."""
    side = sample // 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    inputs = {
        "hidden_states": torch.randn(batch, side * side, 4 * LATENT_CHANNELS, generator=g),
        "encoder_hidden_states": torch.randn(batch, p["text"], p["caption"], generator=g),
        "pooled_projections": torch.randn(batch, p["pooled"], generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(p["text"], 3),
    }
    if p["guidance"]:
        inputs["guidance"] = torch.full((batch,), FluxSpec.train_guidance)
    return inputs


HOSTS: dict[str, Host] = {
    "pixart": Host("PixArtTransformer2DModel", pixart_config, pixart_inputs, PixArtSpec.target_modules),
    "sd3": Host("SD3Transformer2DModel", sd3_config, sd3_inputs, SD3Spec.target_modules),
    "flux": Host("FluxTransformer2DModel", flux_config, flux_inputs, FluxSpec.target_modules),
}
