"""``SD3Spec``: Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``) as the
workflows see it: two CLIP encoders and T5 joined into one sequence plus a pooled projection, flow
matching with logit-normal timesteps (the DreamBooth LoRA script's default), diffusers' sampler."""

from __future__ import annotations

import torch

from atomtune.diffusion.flow import FlowMatchingSpec
from atomtune.diffusion.spec import Prompts, register_spec


class SD3Spec(FlowMatchingSpec):
    #: ``train_dreambooth_lora_sd3.py``'s LoRA targets: both streams of every joint attention module
    target_modules = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    weighting_scheme = "logit_normal"

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        tokenizer = getattr(pipe, "tokenizer_3", None)
        self.max_sequence_length = min(256, getattr(tokenizer, "model_max_length", 256) or 256)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=self.text_device(),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # SD3 attends to all
        return Prompts(embeds, mask, pooled)

    def predict_noise(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: Prompts
    ) -> torch.Tensor:
        """The velocity ``ε - x_0`` the transformer predicts."""
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=prompts.embeds,
            pooled_projections=prompts.pooled,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def generate(self, prompt, negative, seed, steps, guidance_scale, height, width):
        self.check_resolution(height, width)
        latents = self.initial_noise(seed, height, width)
        prompt, negative = self.on_device(prompt), self.on_device(negative)
        transformer = self.pipe.transformer
        out = self.pipe(
            prompt_embeds=prompt.embeds,
            pooled_prompt_embeds=prompt.pooled,
            negative_prompt_embeds=negative.embeds,
            negative_pooled_prompt_embeds=negative.pooled,
            latents=latents.to(transformer.device, transformer.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            max_sequence_length=self.max_sequence_length,
            output_type="pil",
        )
        return out.images[0]


register_spec("StableDiffusion3Pipeline", SD3Spec)
