"""The testbed's text-to-image model: a small ``PixArtTransformer2DModel`` in pixel space.

The same class as PixArt-α/Σ (self-attention, cross-attention to caption tokens, adaLN-single
timestep conditioning), at 1.8 M parameters: 6 blocks, 4 heads x 32, 24x24 RGB in 3x3 patches
(64 tokens), MiniLM's 384-wide token states as captions. ``testbed.pipeline`` samples it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..errors import AtomtuneError
from .digits import CANVAS
from .text import WIDTH

WEIGHTS = "digit_dit.safetensors"
CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "cross_attention_dim": 128,
    "sample_size": CANVAS,
    "patch_size": 3,
    "caption_channels": WIDTH,
    "norm_num_groups": 1,
}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}


def build_transformer(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**CONFIG)


def shipped_weights() -> Path:
    return Path(str(resources.files("atomtune.testbed") / "weights" / WEIGHTS))


def load_transformer(path: str | Path | None = None):
    """The pretrained testbed model: the shipped checkpoint, or a file written by ``pretrain``."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else shipped_weights()
    if not path.is_file():
        raise AtomtuneError(f"testbed weights not found: {path} (run `atomtune testbed pretrain`)")
    model = build_transformer()
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise AtomtuneError(
            f"{path} does not fit the testbed model (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    return model.eval()


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)
