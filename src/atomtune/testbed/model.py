"""The testbed's text-to-image model: a small ``PixArtTransformer2DModel`` in pixel space.

The same class as PixArt-α/Σ (self-attention, cross-attention to caption tokens, adaLN-single
timestep conditioning), at 1.8 M parameters: 6 blocks, 4 heads x 32, 24x24 RGB in 3x3 patches
(64 tokens), MiniLM's 384-wide token states as captions. ``DigitPipeline`` samples it with a
diffusers scheduler and classifier-free guidance.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import AtomtuneError
from .digits import CANVAS
from .text import WIDTH, CaptionEncoder

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


class DigitPipeline:
    """Text → 24x24 image with the testbed transformer (DPM-Solver++, classifier-free guidance)."""

    def __init__(self, transformer, encoder: CaptionEncoder | None = None) -> None:
        from diffusers import DPMSolverMultistepScheduler

        self.transformer = transformer
        self.encoder = encoder or CaptionEncoder()
        # thresholding keeps the predicted x0 in range: at the cosine schedule's last steps
        # alpha is tiny and an unclipped x0 estimate explodes into noise
        self.scheduler = DPMSolverMultistepScheduler(**SCHEDULER, thresholding=True, sample_max_value=1.0)

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.0
    ) -> torch.Tensor:
        """Images in [0, 1], shape (B, 3, 24, 24); each from its own seed."""
        device = next(self.transformer.parameters()).device
        cond, cond_mask = self.encoder.encode(prompts)
        uncond, uncond_mask = self.encoder.encode([""] * len(prompts))
        states = torch.cat([cond, uncond]).to(device)
        mask = torch.cat([cond_mask, uncond_mask]).to(device)
        x = torch.stack(
            [torch.randn(3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device)
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            t_batch = torch.full((2 * len(prompts),), int(t), device=device)
            eps = self.transformer(
                torch.cat([x, x]),
                encoder_hidden_states=states,
                encoder_attention_mask=mask,
                timestep=t_batch,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
            eps_c, eps_u = eps.chunk(2)
            x = self.scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).cpu()


def save_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
