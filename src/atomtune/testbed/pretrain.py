"""Pretrain the testbed DiT on rendered digits, every class but the held-out one.

Plain denoising diffusion (v-prediction by default, cosine schedule), captions dropped 10% of the time for
classifier-free guidance, AdamW, an exponential moving average of the weights (what ships). Each
step's digits, attributes and noise are drawn from generators seeded by (seed, step), so a run
resumed from its last checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from atomtune.checkpoint import latest_checkpoint, load_training_state, save_training_state
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write
from atomtune.progress import progress_bar
from atomtune.testbed.digits import all_captions, load_digits, random_attributes, render_batch, split_indices
from atomtune.testbed.model import (
    WEIGHTS,
    build_transformer,
    model_config,
    scheduler_config,
    training_scheduler,
)
from atomtune.testbed.text import CaptionEncoder
from atomtune.validation import check_number, check_seed


@dataclass
class PretrainSettings:
    steps: int = 7750
    batch: int = 512
    lr: float = 5e-4
    warmup: int = 200
    holdout_digit: int = 9
    caption_dropout: float = 0.1
    ema: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    heads: int = 6
    layers: int = 8
    patch_size: int = 3
    prediction_type: str = "v_prediction"

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "warmup", "checkpoint_every", "heads", "layers", "patch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise AtomtuneError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.holdout_digit <= 9:
            raise AtomtuneError(f"holdout_digit must be 0-9, got {self.holdout_digit}")
        check_number("lr", self.lr, above=0)  # also refuses nan and inf
        check_seed("seed", self.seed)
        if self.lr <= 0 or not 0 <= self.ema < 1 or not 0 <= self.caption_dropout < 1:
            raise AtomtuneError("lr must be > 0, ema and caption_dropout in [0, 1)")
        model_config(self.heads, self.layers, self.patch_size)  # raise early on a bad architecture
        scheduler_config(self.prediction_type)


def training_batch(
    images: np.ndarray, labels: np.ndarray, pool: np.ndarray, batch: int, rng: np.random.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Random real digits from ``pool`` with random color, place and size, and their captions."""
    picks = rng.choice(pool, size=batch)
    attrs = [random_attributes(int(labels[i]), rng) for i in picks]
    x = render_batch(images[picks], attrs)
    return x, [a.caption() for a in attrs]


def caption_table(captions: list[str], features: str | Path | None = None):
    """Text features of ``captions`` from MiniLM, or from a file written by ``save_caption_table``
    (so a machine without the text encoder's package, a lent GPU say, can pretrain too)."""
    if features is None:
        return CaptionEncoder().encode(captions)
    from safetensors.torch import load_file

    table = load_file(str(features))
    return table["states"].float(), table["mask"]


def save_caption_table(captions: list[str], path: str | Path) -> None:
    from safetensors.torch import save_file

    states, mask = CaptionEncoder().encode(captions)
    save_file({"states": states.half().contiguous(), "mask": mask.contiguous()}, str(path))


def pretraining_captions(holdout_digit: int) -> list[str]:
    return [*all_captions([d for d in range(10) if d != holdout_digit]), ""]


def pretrain(
    settings: PretrainSettings,
    out_dir: str | Path,
    progress: bool = True,
    device: str = "cpu",
    features: str | Path | None = None,
) -> Path:
    """Train (resuming from ``out_dir``'s last checkpoint if any); return the EMA weights' path."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits()
    train_idx, _ = split_indices(labels)
    pool = train_idx[labels[train_idx] != settings.holdout_digit]
    config = model_config(settings.heads, settings.layers, settings.patch_size)
    model = build_transformer(settings.seed, config).to(device).train()
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)  # what gets saved and shipped
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / settings.warmup))
    noise_scheduler = training_scheduler(settings.prediction_type)
    # every caption the templates can make, encoded once; a step only gathers rows
    captions_all = pretraining_captions(settings.holdout_digit)
    row_of = {c: i for i, c in enumerate(captions_all)}
    states_all, mask_all = caption_table(captions_all, features)
    states_all, mask_all = states_all.to(device), mask_all.to(device)
    start = 0
    last = latest_checkpoint(out_dir)
    if last is not None:
        tensors, start, _ = load_training_state(last, optimizer)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema_model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        schedule.last_epoch = start
    # diffusers' EMA, its default warm-up min(ema, (1 + s) / (10 + s)): early steps forget the init
    ema = EMAModel(ema_model.parameters(), decay=settings.ema, foreach=True)
    ema.optimization_step = start
    began = time.perf_counter()
    bar = progress_bar(
        range(start, settings.steps),
        initial=start,
        total=settings.steps,
        desc="pretrain",
        disable=not progress,
    )
    for step in bar:
        rng = np.random.default_rng([settings.seed, step])
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        x, captions = training_batch(images, labels, pool, settings.batch, rng)
        captions = ["" if rng.random() < settings.caption_dropout else c for c in captions]
        rows = torch.tensor([row_of[c] for c in captions], device=device)
        states, mask = states_all[rows], mask_all[rows]
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x),), generator=gen)
        x, noise, t = x.to(device), noise.to(device), t.to(device)
        pred = model(
            noise_scheduler.add_noise(x, noise, t),
            encoder_hidden_states=states,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        target = noise if settings.prediction_type == "epsilon" else noise_scheduler.get_velocity(x, noise, t)
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(model.parameters())
        if step % 25 == 0:  # reading the loss waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            ema.copy_to(ema_model.parameters())
            state = {f"model.{k}": v for k, v in model.state_dict().items()}
            state.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
            save_training_state(out_dir / f"checkpoint-{done}", state, optimizer, done, asdict(settings))
            save_weights(ema_model, out_dir, settings)  # usable weights even if the run stops here
            for old in out_dir.glob("checkpoint-*"):
                if old.name != f"checkpoint-{done}":
                    import shutil

                    shutil.rmtree(old, ignore_errors=True)
    ema.copy_to(ema_model.parameters())
    weights = save_weights(ema_model, out_dir, settings)
    (out_dir / "pretrain_seconds.txt").write_text(f"{time.perf_counter() - began:.1f}\n")
    return weights


def save_weights(ema: torch.nn.Module, out_dir: Path, settings: PretrainSettings) -> Path:
    """The EMA weights in float16 with the architecture and schedule: what ships inside the package."""
    from safetensors.torch import save_file

    half = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in ema.state_dict().items()}
    metadata = {
        "settings": json.dumps(asdict(settings)),
        "model": json.dumps(model_config(settings.heads, settings.layers, settings.patch_size)),
        "scheduler": json.dumps(scheduler_config(settings.prediction_type)),
    }
    weights = out_dir / WEIGHTS
    atomic_write(weights, lambda p: save_file(half, str(p), metadata=metadata))
    return weights
