"""Models built from configs in-process: for the self-check, the tests and quick experiments.

No download, a second to build. The PixArt ones are the real ``PixArtTransformer2DModel`` class with
small sizes, so everything that works here runs the same code path as PixArt-α/Σ. Every
transformer atomtune builds from a config with random weights (this tiny one, the testbed's digit
model, the speed benchmark's full-size hosts) is built by ``from_config`` (``pixart_from_config``
for PixArt), so a seed means the same weights everywhere.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


def from_config(model_class: type, config: dict[str, Any], seed: int = 0, device=None):
    """``model_class(**config)`` with random weights drawn after ``torch.manual_seed(seed)``.

    ``device`` initialises the weights in place there (a 600 M model builds in seconds on a GPU
    instead of minutes on the CPU; ``"meta"`` gives the shapes only); ``None`` builds on the CPU.
    """
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else nullcontext():
        return model_class(**config)


def pixart_from_config(config: dict[str, Any], seed: int = 0, device: str | torch.device | None = None):
    """``PixArtTransformer2DModel(**config)`` built by ``from_config``."""
    from diffusers import PixArtTransformer2DModel

    return from_config(PixArtTransformer2DModel, config, seed, device)


def tiny_pixart(seed: int = 0, heads: int = 2, head_dim: int = 8, layers: int = 2, sample_size: int = 8):
    """A small ``PixArtTransformer2DModel`` (self- and cross-attention in every block)."""
    config = {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": layers,
        "cross_attention_dim": heads * head_dim,
        "sample_size": sample_size,
        "patch_size": 2,
        "caption_channels": 12,
        "norm_num_groups": 1,
    }
    return pixart_from_config(config, seed).eval()


def tiny_pixart_inputs(batch: int = 2, seed: int = 1, sample_size: int = 8, text_len: int = 5) -> dict:
    """Keyword arguments for ``tiny_pixart``'s forward, with a padded caption in the first item."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, text_len // 2 + 1 :] = 0
    return {
        "hidden_states": torch.randn(batch, 4, sample_size, sample_size, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, 12, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def tiny_causal_lm(kind: str = "llama", seed: int = 0):
    """A small transformers causal LM: ``"llama"`` (nn.Linear MLP) or ``"gpt2"`` (Conv1D MLP)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


# -- the other DiT hosts at tiny sizes (SD3/SD3.5, Flux, Sana), with inputs for one forward --------
def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float64):
    """SD3.5-shaped: 2 joint blocks, block 0 with the dual image-only ``attn2``, per-head RMS QK-norm;
    the last block is ``context_pre_only`` (its text output is not projected)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return model if dtype == torch.float32 else model.to(dtype)


def sd3_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g, dtype=torch.float64),
        "pooled_projections": torch.randn(batch, 16, generator=g, dtype=torch.float64),
        "timestep": torch.tensor([3, 500][:batch]),
    }


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float64):
    """Flux-shaped: one double (joint, two-stream) block and one single (pre-only) block, RoPE."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return model if dtype == torch.float32 else model.to(dtype)


def flux_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"))
    return {
        "hidden_states": torch.randn(batch, 16, 4, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g, dtype=torch.float64),
        "pooled_projections": torch.randn(batch, 32, generator=g, dtype=torch.float64),
        "timestep": torch.tensor([0.2, 0.9][:batch], dtype=torch.float64),
        "img_ids": img_ids.reshape(3, -1).T,
        "txt_ids": torch.zeros(6, 3),
    }


def tiny_sana(seed: int = 0, dtype: torch.dtype = torch.float64):
    """Sana-shaped: linear (ReLU) self-attention and softmax cross-attention to the caption."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    )
    return model if dtype == torch.float32 else model.to(dtype)


def sana_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 5)
    mask[0, -2:] = 0  # padded caption tokens
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=g, dtype=torch.float64),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([3, 500][:batch]),
    }
