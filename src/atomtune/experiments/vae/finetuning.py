"""The two ways the pretrained VAE is fine-tuned to the new digit: atoms, and LoRA at the same budget.

Both adapt the same projections of the four attention modules (``to_q, to_k, to_v, to_out.0``;
atoms in the ``"attention"`` form the modules' value path instead) with the base frozen, and both
leave the model unchanged at step 0 (the tests check it), so what they learn is the only difference.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from atomtune.core.budget import AtomBudgetRun
from atomtune.core.config import AtomConfig
from atomtune.core.model import AtomModel
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.settings import VaeSettings
from atomtune.experiments.vae.training import train

ATTENTION_MODULES = r"^(encoder|decoder)\.\d+\.attn$"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PROJECTIONS = r"^(encoder|decoder)\.\d+\.attn\.(" + "|".join(re.escape(t) for t in LORA_TARGETS) + ")$"


def atom_config(s: VaeSettings, atom_budget: int | None = None) -> AtomConfig:
    """Atoms on LoRA's projections of the four attention modules, each with its own dictionary
    (``s.form="projections"``), or the paper's attention-mode update of the four modules
    (``"attention"``); the core's defaults for everything else.

    ``atom_budget``: the core's dense-then-prune recipe, ``num_atoms`` trained, cut during training
    to this many per module (``AtomConfig.atom_budget``, its cuts and learning-rate rule as the core
    sets them); ``None`` keeps all atoms.
    """
    overrides: dict[str, Any] = {}
    if s.sparsity_weight is not None:
        overrides["sparsity_weight"] = s.sparsity_weight
    if s.lambda_init is not None:
        overrides["lambda_init"] = s.lambda_init
    if s.form == "projections":
        overrides.update(mode="linear", target_modules=PROJECTIONS)
    else:
        overrides.update(mode="attention", attention="self", target_modules=ATTENTION_MODULES)
    return AtomConfig(num_atoms=s.num_atoms, atom_budget=atom_budget, **overrides)


def add_atoms(vae: TransformerVAE, s: VaeSettings, atom_budget: int | None = None) -> AtomModel:
    """Inject atoms into ``vae`` (in place; the base frozen). At step 0 the output is unchanged."""
    torch.manual_seed(s.seed + 11)
    return AtomModel(vae, atom_config(s, atom_budget))


def add_lora(vae: TransformerVAE, s: VaeSettings, rank: int | None = None) -> TransformerVAE:
    """Inject PEFT LoRA into the same four attention modules' projections (in place; the base frozen).

    ``rank``: ``s.lora_rank`` unless given (the budget runs' LoRA is smaller).
    """
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(s.seed + 12)
    rank = s.lora_rank if rank is None else rank
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJECTIONS)
    for p in vae.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, vae)
    for name, p in vae.named_parameters():
        p.requires_grad_("lora_" in name)
    return vae


def finetune_atoms(
    vae: TransformerVAE,
    s: VaeSettings,
    images: torch.Tensor,
    atom_budget: int | None,
    progress: bool,
) -> tuple[TransformerVAE, AtomModel, list[float]]:
    """A copy of ``vae`` with atoms, fine-tuned on ``images``; with a budget, cut and pruned to it.

    The budget is applied as the training workflow applies it: ``AtomBudgetRun`` watches the atoms'
    contributions, cuts at its scheduled steps (raising the learning rate for the survivors by the
    factor it returns) and prunes the adapter once training ends.
    """
    tuned = copy.deepcopy(vae)
    atoms = add_atoms(tuned, s, atom_budget)
    tuned.train()
    budget = AtomBudgetRun.start(atoms, s.finetune_steps, s.seed)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return tuned.loss(x) + atoms.regularization_loss()

    desc = "atoms" if budget is None else f"atoms, budget {atom_budget}"
    after_step = None if budget is None else budget.after_step
    losses = train(
        loss, atoms.trainable_parameters(), images, s, s.finetune_steps, desc, progress, after_step
    )
    if budget is not None:
        budget.finish()
    return tuned, atoms, losses


def finetune_lora(
    vae: TransformerVAE, s: VaeSettings, images: torch.Tensor, rank: int, progress: bool
) -> tuple[TransformerVAE, list[float]]:
    """A copy of ``vae`` with LoRA of ``rank``, fine-tuned on ``images``."""
    tuned = add_lora(copy.deepcopy(vae), s, rank)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    losses = train(tuned.loss, params, images, s, s.finetune_steps, f"LoRA r{rank}", progress)
    return tuned, losses
