"""One trainer for atoms, LoRA, DoRA and OFT: DreamBooth-style concept customization of a DiT.

The loss is the diffusion loss on the instance images with the instance prompt ("a sks dog"), plus,
with a class prompt, the same loss on class images of the base model (prior preservation), plus the
method's own regularization (atoms: L1 on the coefficients and orthogonality of the atoms). The
paper's defaults: CAME, lr 1e-4, 15 epochs. Accelerate places the model, runs bf16/fp16 autocast and
several GPUs; prompts and images are encoded once, so the text encoder can leave the GPU.

Every random draw of the loop (batch order, latent samples, noise, timesteps) comes from one torch
generator whose state is saved in each checkpoint with the adapter and the optimizer state, so
``resume`` continues exactly where the checkpoint was taken.
"""

from atomtune.workflows.train.card import model_card
from atomtune.workflows.train.data import ensure_class_images
from atomtune.workflows.train.loop import TrainResult, train
from atomtune.workflows.train.settings import TrainSettings, read_settings_file

__all__ = ["TrainResult", "TrainSettings", "ensure_class_images", "model_card", "read_settings_file", "train"]
