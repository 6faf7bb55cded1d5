"""``FluxSpec``: Flux.1 (``FluxPipeline``, ``FluxTransformer2DModel``) as the workflows see it: CLIP's
pooled embedding and T5's sequence, latents packed into 2x2 patches with their position ids, the
timestep passed as σ in [0, 1], and the distilled guidance as an input where the model has one (dev);
flow matching with uniform timesteps, as ``train_dreambooth_lora_flux.py`` defaults."""

from __future__ import annotations

import torch

from atomtune.diffusion.flow import FlowMatchingSpec
from atomtune.diffusion.spec import Prompts, register_spec


class FluxSpec(FlowMatchingSpec):
    #: ``train_dreambooth_lora_flux.py``'s LoRA targets: attention (both streams; single blocks match
    #: ``attn.to_q/k/v``) and the double blocks' feed-forward layers
    target_modules = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    latent_multiple = 2  # latents are packed into 2x2 patches
    train_guidance = 3.5  # the script's guidance input while training a guidance-distilled model

    def __init__(self, pipe) -> None:
        super().__init__(pipe)
        tokenizer = getattr(pipe, "tokenizer_2", None)
        self.max_sequence_length = min(512, getattr(tokenizer, "model_max_length", 512) or 512)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Prompts:
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, device=self.text_device(), max_sequence_length=self.max_sequence_length
        )
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # Flux attends to all
        return Prompts(embeds, mask, pooled)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, h/2 · w/2, 4C): the token sequence Flux's transformer reads."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of ``pack`` for latents of side ``h`` x ``w``."""
        factor = self.vae_scale_factor
        return self.pipe._unpack_latents(tokens, h * factor, w * factor, factor)

    def predict_noise(
        self, model: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: Prompts
    ) -> torch.Tensor:
        """The velocity ``ε - x_0``, unpacked to the latents' shape."""
        b, _, h, w = noisy.shape
        image_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(prompts.embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:  # (``model`` may be a DDP wrapper)
            guidance = torch.full((b,), self.train_guidance, device=noisy.device, dtype=torch.float32)
        out = model(
            hidden_states=self.pack(noisy),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=prompts.pooled,
            encoder_hidden_states=prompts.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    @torch.no_grad()
    def generate(self, prompt, negative, seed, steps, guidance_scale, height, width):
        """One image; ``guidance_scale`` is the distilled guidance input of a model that has one (dev)
        and has no effect otherwise (schnell): Flux samples without a negative prompt."""
        self.check_resolution(height, width)
        latents = self.pack(self.initial_noise(seed, height, width))
        prompt = self.on_device(prompt)
        transformer = self.pipe.transformer
        out = self.pipe(
            prompt_embeds=prompt.embeds,
            pooled_prompt_embeds=prompt.pooled,
            latents=latents.to(transformer.device, transformer.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            max_sequence_length=self.max_sequence_length,
            output_type="pil",
        )
        return out.images[0]


register_spec("FluxPipeline", FluxSpec)
