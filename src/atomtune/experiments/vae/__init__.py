"""The paper's VAE experiment (supplementary B): a transformer VAE that makes one digit, taught another.

Claim under test: a model that generates 8s generates 3s once a sparse dictionary of atoms is added
to its attention layers, and the change is carried by a handful of atoms per layer (a public summary
of the paper's figure: 8 atoms in layer 1, 4 in layer 2); removing a top atom changes what is drawn.

Model (section B): 28x28 images cut into 16 patches of 7x7; encoder and decoder of two pre-norm
transformer layers each (width 128, 4 heads, an MLP of twice the width), latent 32, Adam 1e-3. The
attention layers are diffusers ``Attention`` modules, so the core's attention mode applies as it does
to a DiT. The encoder mean-pools its tokens into the latent's mean and log-variance; the decoder adds
a projection of ``z`` to 16 learned position tokens and maps each token back to a patch (logits).
Loss: the ELBO (Bernoulli pixels, KL to N(0, I)) divided by the 784 pixels.

Steps:

1. Pretrain on the old digit (8) from scratch.
2. Fine-tune to the new digit (3) on the same loss, base frozen, two ways at the same budget:
   atoms (``AtomConfig(mode="attention")``, ``num_atoms`` per attention module, all four modules,
   loss + ``atoms.regularization_loss()``) and LoRA (PEFT ``LoraConfig`` on ``to_q``, ``to_k``,
   ``to_v``, ``to_out.0`` of the same four modules, rank ``lora_rank``). 32 atoms cost
   32·(128 + 128 + 1) = 8224 parameters per module, LoRA rank 8 on four 128x128 projections 8192.
   Then at a smaller budget: atoms with the core's dense-then-prune recipe (``AtomConfig.atom_budget``
   = ``atom_budget``, applied by ``core.budget.AtomBudgetRun`` as the training workflow applies it:
   cuts to the atoms of largest contribution, the learning rate raised for the survivors, the
   adapter pruned at the end), and LoRA of rank ``budget_lora_rank`` (8 atoms ≈ rank 2).
3. Measure generation from the prior (``z ~ N(0, I)``, the same ``z`` for every model) with a digit
   judge: a small CNN trained here on the real digits of all ten classes (train split), its accuracy
   on the held-out split reported. P(new) is its mean probability of the new digit.
4. Read the atoms with the core's tools: ``AtomStatistics`` over encoding the new digit's training
   images and decoding the prior samples gives each atom's contribution ``E|s|·‖d‖`` and ``P(s≠0)``;
   ``selection.share_masks(per_module=True)`` counts the atoms that carry 90% of each layer's
   contribution. The LoRA analogue: each rank-one component ``b_i·a_iᵀ`` of each projection, its
   contribution ``E|a_i·x|·‖b_i‖·scale``, 4 x rank components per attention module (as many as atoms).
5. What the top atoms do: decode the same ``z`` with one top atom of a decoder layer removed (mask 0),
   and with the 90% atoms only; the same removal for the top LoRA components. Reported as P(new) and
   the mean pixel change.

Written atomically into the output folder: ``vae.json`` (every number), ``vae.md`` (the tables) and
``vae.png`` (samples and removals).
"""

from atomtune.experiments.vae.finetuning import (
    ATTENTION_MODULES,
    LORA_TARGETS,
    add_atoms,
    add_lora,
    atom_config,
    finetune_atoms,
    finetune_lora,
)
from atomtune.experiments.vae.judge import DigitJudge, judge_images, train_judge
from atomtune.experiments.vae.lora_components import LoraStatistics, lora_component_removed, lora_components
from atomtune.experiments.vae.measures import (
    atom_removed,
    atoms_masked,
    count_for_share,
    measure_atoms,
    measure_lora,
    removal_effects,
)
from atomtune.experiments.vae.model import TransformerLayer, TransformerVAE
from atomtune.experiments.vae.run import run_vae
from atomtune.experiments.vae.settings import IMAGE, VaeSettings
from atomtune.experiments.vae.training import train

__all__ = [
    "ATTENTION_MODULES",
    "IMAGE",
    "LORA_TARGETS",
    "DigitJudge",
    "LoraStatistics",
    "TransformerLayer",
    "TransformerVAE",
    "VaeSettings",
    "add_atoms",
    "add_lora",
    "atom_config",
    "atom_removed",
    "atoms_masked",
    "count_for_share",
    "finetune_atoms",
    "finetune_lora",
    "judge_images",
    "lora_component_removed",
    "lora_components",
    "measure_atoms",
    "measure_lora",
    "removal_effects",
    "run_vae",
    "train",
    "train_judge",
]
