"""The testbed's text-to-image model: a small ``PixArtTransformer2DModel`` in pixel space.

The same class as PixArt-α/Σ (self-attention, cross-attention to caption tokens, adaLN-single
timestep conditioning), a few million parameters, 24x24 RGB canvases, MiniLM's 384-wide token
states as captions. A weights file carries its architecture and noise schedule in its metadata,
so a model pretrained at another size loads without code changes. ``testbed.pipeline`` samples it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from atomtune.errors import AtomtuneError
from atomtune.testbed.digits import CANVAS
from atomtune.testbed.text import WIDTH

WEIGHTS = "digit_dit.safetensors"


def model_config(heads: int = 6, layers: int = 8, patch_size: int = 3) -> dict:
    """``PixArtTransformer2DModel`` arguments: ``heads`` x 32 wide, ``layers`` blocks."""
    if CANVAS % patch_size:
        raise AtomtuneError(f"patch_size must divide the {CANVAS}-pixel canvas, got {patch_size}")
    return {
        "num_attention_heads": heads,
        "attention_head_dim": 32,
        "in_channels": 3,
        "out_channels": 3,
        "num_layers": layers,
        "cross_attention_dim": heads * 32,
        "sample_size": CANVAS,
        "patch_size": patch_size,
        "caption_channels": WIDTH,
        "norm_num_groups": 1,
    }


def scheduler_config(prediction_type: str = "v_prediction") -> dict:
    if prediction_type not in ("epsilon", "v_prediction"):
        raise AtomtuneError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": prediction_type,
    }


def build_transformer(seed: int = 0, config: dict | None = None):
    """The testbed model with random weights (``config``: ``model_config()``'s by default)."""
    from atomtune.tiny import pixart_from_config

    return pixart_from_config(config or model_config(), seed)


def shipped_weights() -> Path:
    return Path(str(resources.files("atomtune.testbed") / "weights" / WEIGHTS))


def read_metadata(path: str | Path | None = None) -> tuple[Path, dict, dict]:
    """(path, model config, scheduler config) of a testbed weights file (default: the shipped one)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else shipped_weights()
    if not path.is_file():
        raise AtomtuneError(f"testbed weights not found: {path} (run `atomtune testbed pretrain`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        model = json.loads(meta["model"]) if "model" in meta else model_config()
        sched = json.loads(meta["scheduler"]) if "scheduler" in meta else scheduler_config()
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # a corrupt header
        raise AtomtuneError(f"{path} is not a readable safetensors file: {err}") from err
    if not isinstance(model, dict) or not isinstance(sched, dict):
        raise AtomtuneError(f"{path}: the model and scheduler metadata must be JSON objects")
    return path, model, sched


def load_digit_transformer(path: str | Path | None = None):
    """The pretrained testbed model: the shipped checkpoint, or a file written by ``pretrain``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from atomtune.validation import check_tensor

    path, config, _ = read_metadata(path)
    try:
        model = build_transformer(config=config)
        state = load_file(str(path))
        for key, tensor in state.items():
            check_tensor(tensor, f"{path}: {key}", None, (tensor.dtype,))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as err:
        if isinstance(err, AtomtuneError):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AtomtuneError(f"{path} is not a testbed model's weights ({reason})") from err
    if missing or unexpected:
        raise AtomtuneError(
            f"{path} does not fit the testbed model (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    return model.float().eval()


def training_scheduler(prediction_type: str = "v_prediction"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(prediction_type))
