"""``SanaSpec``: Sana (``SanaPipeline``, ``SanaTransformer2DModel``) as the workflows see it: Gemma-2
prompt embeddings with their mask (no complex human instruction, as ``train_dreambooth_lora_sana.py``
defaults), the deep-compression autoencoder (``AutoencoderDC``: a deterministic latent, no
posterior), flow matching with uniform timesteps."""

from __future__ import annotations

import torch

from atomtune.diffusion.flow import FlowMatchingSpec
from atomtune.diffusion.spec import Prompts, register_spec


class SanaSpec(FlowMatchingSpec):
    #: ``train_dreambooth_lora_sana.py``'s LoRA targets: q, k and v of self- and cross-attention
    target_modules = ("to_k", "to_q", "to_v")

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        tokenizer = getattr(pipe, "tokenizer", None)
        self.max_sequence_length = min(300, getattr(tokenizer, "model_max_length", 300) or 300)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.text_device(),
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=None,
        )
        return Prompts(embeds, mask)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DC-AE latent (deterministic: its "posterior" has zero spread)."""
        vae = self.pipe.vae
        latent = vae.encode(pixels.to(vae.device, vae.dtype)).latent.float().cpu()
        return latent, torch.zeros_like(latent)

    def predict_noise(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: Prompts
    ) -> torch.Tensor:
        """The velocity ``ε - x_0`` (learned-sigma channels dropped, as the pipeline does)."""
        out = model(
            hidden_states=noisy,
            encoder_hidden_states=prompts.embeds,
            encoder_attention_mask=prompts.mask,
            timestep=timesteps * self.pipe.transformer.config.timestep_scale,
            return_dict=False,
        )[0]
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out

    @torch.no_grad()
    def generate(self, prompt, negative, seed, steps, guidance_scale, height, width):
        self.check_resolution(height, width)
        latents = self.initial_noise(seed, height, width)
        prompt, negative = self.on_device(prompt), self.on_device(negative)
        transformer = self.pipe.transformer
        out = self.pipe(
            negative_prompt=None,
            prompt_embeds=prompt.embeds,
            prompt_attention_mask=prompt.mask,
            negative_prompt_embeds=negative.embeds,
            negative_prompt_attention_mask=negative.mask,
            latents=latents.to(transformer.device, transformer.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            use_resolution_binning=False,
            max_sequence_length=self.max_sequence_length,
            clean_caption=False,
            complex_human_instruction=None,
            output_type="pil",
        )
        return out.images[0]


register_spec("SanaPipeline", SanaSpec)
