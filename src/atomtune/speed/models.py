"""The host measured: PixArt at a preset's size with random weights, its inputs, and the parameter
yardstick (LoRA r=16's count, and the atom count that comes nearest it).

Random weights suffice: a step costs the same whatever the weights' values. The transformer is
built by ``tiny.pixart_from_config``, the one builder of PixArt transformers from a config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from atomtune.core.hosts import diffusers as dx
from atomtune.speed.settings import PRESETS, check_atom_count
from atomtune.tiny import pixart_from_config

LORA_RANK = 16  # the yardstick of "vs LoRA r16 params" and of atoms at "parity"


def pixart_config(preset: str, sample: int | None = None) -> dict[str, Any]:
    """``PixArtTransformer2DModel`` arguments at the preset's size; ``sample`` (latent side) overrides
    the preset's."""
    p = PRESETS[preset]
    sample = sample or p["sample"]
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


def build_transformer(preset: str, device: str, dtype: torch.dtype, sample: int | None = None) -> nn.Module:
    """PixArt at the preset's size with random weights (seed 0), initialised in place on ``device``."""
    from atomtune.progress import show_notices_once

    show_notices_once(("diffusers",))  # a notice per model built would repeat once per method
    model = pixart_from_config(pixart_config(preset, sample), seed=0, device=device)
    return cast_host(model, dtype)


def cast_host(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model as ``from_pretrained(torch_dtype=dtype)`` leaves it: everything in ``dtype`` except
    the class's ``_keep_in_fp32_modules``. (diffusers' own ``.to(dtype)`` warns that such modules
    exist even for models that have none, PixArt among them.)"""
    nn.Module.to(model, dtype=dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name for k in keep):
            nn.Module.to(module, dtype=torch.float32)
    return model


def make_inputs(
    preset: str, batch: int, device: str, dtype: torch.dtype, sample: int | None = None
) -> dict[str, Any]:
    """Random latents and caption states of the preset's shapes (seed 0), timestep 500."""
    p = PRESETS[preset]
    sample = sample or p["sample"]
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, sample, sample, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, p["text"], p["caption"], generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if dx.is_attention(m)]


def lora_params(model: nn.Module, rank: int = LORA_RANK) -> int:
    """Trainable parameters of LoRA ``rank`` on q, k, v and out: ``rank·(in + out)`` per linear."""
    total = 0
    for attn in _attentions(model):
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            total += rank * (linear.in_features + linear.out_features)
    return total


def parity_atoms(model: nn.Module, rank: int = LORA_RANK) -> int:
    """Atoms per module whose trainable parameters come nearest LoRA ``rank``'s (a multiple of the heads).

    Per attention module atoms train ``W_s`` (context x M), ``D`` (M x value width) and λ (M).
    """
    attns = _attentions(model)
    per_atom = sum(a.to_v.in_features + a.to_out[0].in_features + 1 for a in attns)
    heads = attns[0].heads
    return max(heads, round(lora_params(model, rank) / per_atom / heads) * heads)


def resolve_atoms(entries: tuple[str | int, ...], preset: str) -> tuple[int, ...]:
    """``"parity"`` → the atom count at LoRA r=16's parameters (``parity_atoms``); numbers as given."""
    counts = []
    for entry in entries:
        if entry == "parity":
            counts.append(parity_atoms(build_transformer(preset, "meta", torch.float32)))  # shapes only
        else:
            counts.append(check_atom_count(entry, preset))
    return tuple(dict.fromkeys(counts))
