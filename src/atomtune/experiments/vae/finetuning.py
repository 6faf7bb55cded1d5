"""The two ways the pretrained VAE is fine-tuned to the new digit: atoms, and LoRA at the same budget.

Both adapt the same four attention modules with the base frozen, and both leave the model unchanged
at step 0 (the tests check it), so what they learn is the only difference between them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from atomtune.core.config import AtomConfig
from atomtune.core.model import AtomModel
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.settings import VaeSettings

ATTENTION_MODULES = r"^(encoder|decoder)\.\d+\.attn$"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def atom_config(s: VaeSettings) -> AtomConfig:
    """Attention-mode atoms on the four attention modules; the core's defaults for everything else."""
    overrides: dict[str, Any] = {}
    if s.sparsity_weight is not None:
        overrides["sparsity_weight"] = s.sparsity_weight
    if s.lambda_init is not None:
        overrides["lambda_init"] = s.lambda_init
    return AtomConfig(
        mode="attention",
        num_atoms=s.num_atoms,
        attention="self",
        target_modules=ATTENTION_MODULES,
        **overrides,
    )


def add_atoms(vae: TransformerVAE, s: VaeSettings) -> AtomModel:
    """Inject atoms into ``vae`` (in place; the base frozen). At step 0 the output is unchanged."""
    torch.manual_seed(s.seed + 11)
    return AtomModel(vae, atom_config(s))


def add_lora(vae: TransformerVAE, s: VaeSettings) -> TransformerVAE:
    """Inject PEFT LoRA into the same four attention modules' projections (in place; the base frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(s.seed + 12)
    projections = "|".join(re.escape(t) for t in LORA_TARGETS)
    config = LoraConfig(
        r=s.lora_rank,
        lora_alpha=s.lora_rank,
        target_modules=rf"^(encoder|decoder)\.\d+\.attn\.({projections})$",
    )
    for p in vae.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, vae)
    for name, p in vae.named_parameters():
        p.requires_grad_("lora_" in name)
    return vae
