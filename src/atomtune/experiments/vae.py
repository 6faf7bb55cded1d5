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

from __future__ import annotations

import copy
import io
import json
import math
import platform
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from atomtune.core.config import AtomConfig
from atomtune.core.model import AtomModel
from atomtune.core.selection import share_masks
from atomtune.core.stats import AtomStatistics
from atomtune.errors import AtomtuneError
from atomtune.experiments.digit_data import load_digit_images, split_per_class
from atomtune.io import atomic_write

IMAGE = 28
ATTENTION_MODULES = r"^(encoder|decoder)\.\d+\.attn$"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class VaeSettings:
    """Every knob of the experiment; the model's shape and optimiser are the paper's (supplementary B)."""

    seed: int = 0
    data: str = "digits"  # "digits" (scikit-learn's, bundled) or "mnist-idx"
    mnist_dir: str | None = None
    old_digit: int = 8
    new_digit: int = 3
    images_per_class: int | None = None  # cap per class before the split (None: all)
    # model (section B)
    width: int = 128
    heads: int = 4
    layers: int = 2  # per encoder and per decoder
    patch: int = 7
    latent: int = 32
    mlp_ratio: int = 2
    # training: Adam at the paper's 1e-3 for pretraining and both fine-tunes
    lr: float = 1e-3
    batch_size: int = 64
    pretrain_steps: int = 1200
    finetune_steps: int = 400
    # atoms: the core's AtomConfig defaults but for these
    num_atoms: int = 32  # per attention module (8 per head)
    sparsity_weight: float | None = None  # None: AtomConfig's default
    lambda_init: float | None = None
    # LoRA at the same budget
    lora_rank: int = 8
    # judge
    judge_steps: int = 400
    # measures
    samples: int = 256  # prior samples judged per model
    share: float = 0.9  # contribution share whose atoms are counted
    top_removed: int = 3  # top atoms (LoRA components) removed one at a time, per decoder layer
    figure_samples: int = 8

    @classmethod
    def fast(cls, seed: int = 0) -> VaeSettings:
        """The tests' and ``--fast``'s setting: short runs, fewer samples (seconds, not minutes)."""
        return cls(
            seed=seed, pretrain_steps=250, finetune_steps=120, judge_steps=150, samples=64, top_removed=1
        )

    def replace(self, **changes: Any) -> VaeSettings:
        return replace(self, **changes)

    def validate(self) -> None:
        if self.data not in ("digits", "mnist-idx"):
            raise AtomtuneError(f"data must be 'digits' or 'mnist-idx', got {self.data!r}")
        for name in ("old_digit", "new_digit"):
            if not 0 <= getattr(self, name) <= 9:
                raise AtomtuneError(f"{name} must be a digit 0-9, got {getattr(self, name)}")
        if self.images_per_class is not None and self.images_per_class < 5:
            raise AtomtuneError(f"images_per_class must be >= 5, got {self.images_per_class}")
        if self.old_digit == self.new_digit:
            raise AtomtuneError("old and new digit must differ")
        if IMAGE % self.patch or self.width % self.heads or self.num_atoms % self.heads:
            raise AtomtuneError("patch must divide 28, and heads must divide width and num_atoms")
        for name in ("pretrain_steps", "finetune_steps", "judge_steps", "samples", "lora_rank", "batch_size"):
            if getattr(self, name) < 1:
                raise AtomtuneError(f"{name} must be >= 1, got {getattr(self, name)}")


# -------------------------------------------------------------------------------------------- model


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer; the attention is diffusers' ``Attention`` (so atoms can adapt it)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(query_dim=width, heads=heads, dim_head=width // heads, bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerVAE(nn.Module):
    """Section B's VAE: patches → 2 layers → (μ, log σ²) of a 32-d latent → 2 layers → patches."""

    def __init__(self, s: VaeSettings) -> None:
        super().__init__()
        self.patch = s.patch
        tokens, pixels = (IMAGE // s.patch) ** 2, s.patch * s.patch
        self.embed = nn.Linear(pixels, s.width)
        self.enc_pos = nn.Parameter(torch.randn(tokens, s.width) * 0.02)
        self.encoder = nn.ModuleList(TransformerLayer(s.width, s.heads, s.mlp_ratio) for _ in range(s.layers))
        self.enc_norm = nn.LayerNorm(s.width)
        self.to_latent = nn.Linear(s.width, 2 * s.latent)
        self.from_latent = nn.Linear(s.latent, s.width)
        self.dec_pos = nn.Parameter(torch.randn(tokens, s.width) * 0.02)
        self.decoder = nn.ModuleList(TransformerLayer(s.width, s.heads, s.mlp_ratio) for _ in range(s.layers))
        self.dec_norm = nn.LayerNorm(s.width)
        self.to_patch = nn.Linear(s.width, pixels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 28, 28) → μ, log σ² (B, latent)."""
        p = self.patch
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, 16, 49)
        h = self.embed(patches) + self.enc_pos
        for layer in self.encoder:
            h = layer(h)
        return self.to_latent(self.enc_norm(h).mean(1)).chunk(2, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) → pixel logits (B, 1, 28, 28)."""
        h = self.from_latent(z)[:, None] + self.dec_pos
        for layer in self.decoder:
            h = layer(h)
        patches = self.to_patch(self.dec_norm(h)).transpose(1, 2)
        return F.fold(patches, (IMAGE, IMAGE), self.patch, stride=self.patch)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per pixel (Bernoulli pixels, KL to N(0, I)), averaged over the batch."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="sum")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
        return (rec + kl) / (x.shape[0] * IMAGE * IMAGE)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode(z))


def train(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    images: torch.Tensor,
    s: VaeSettings,
    steps: int,
    desc: str,
    progress: bool,
) -> list[float]:
    """Adam at ``s.lr`` on minibatches of ``images``; returns the per-step losses."""
    opt = torch.optim.Adam(params, lr=s.lr)
    g = torch.Generator().manual_seed(s.seed + 101)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch = images[torch.randint(len(images), (s.batch_size,), generator=g)]
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
    bar.close()
    return losses


# -------------------------------------------------------------------------------------------- judge


class DigitJudge(nn.Sequential):
    """A small CNN on 28x28 digits: two strided convolutions and a linear read-out (10 classes)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        )


def train_judge(
    images: torch.Tensor, labels: torch.Tensor, s: VaeSettings, progress: bool
) -> tuple[DigitJudge, list[float]]:
    """Train the judge on real digits, shifted by up to 2 pixels so that it reads digits, not positions."""
    torch.manual_seed(s.seed + 7)
    judge = DigitJudge()
    g = torch.Generator().manual_seed(s.seed + 8)

    def loss_fn(batch_idx: torch.Tensor) -> torch.Tensor:
        dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(images[batch_idx], (dy, dx), dims=(2, 3))
        return F.cross_entropy(judge(x), labels[batch_idx])

    index = torch.arange(len(images))
    losses = train(loss_fn, list(judge.parameters()), index, s, s.judge_steps, "judge", progress)
    judge.eval()
    return judge, losses


@torch.no_grad()
def judge_images(judge: DigitJudge, images: torch.Tensor, s: VaeSettings) -> dict[str, float]:
    """P(new digit), P(old digit) (mean softmax) and the share judged the new digit (argmax)."""
    p = judge(images).softmax(-1)
    return {
        "p_new": p[:, s.new_digit].mean().item(),
        "p_old": p[:, s.old_digit].mean().item(),
        "share_judged_new": (p.argmax(-1) == s.new_digit).float().mean().item(),
    }


# ------------------------------------------------------------------------------------- fine-tuning


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


def lora_components(vae: TransformerVAE) -> dict[str, list[tuple[str, nn.Module]]]:
    """Per attention module, its LoRA-wrapped projections ``[(projection name, lora layer), ...]``."""
    out: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in vae.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            attn, _, proj = name.partition(".attn.")
            out.setdefault(f"{attn}.attn", []).append((proj, module))
    return out


class LoraStatistics:
    """``E|a_i·x|`` of each LoRA component while in a ``with`` block (the analogue of ``AtomStatistics``)."""

    def __init__(self, vae: TransformerVAE) -> None:
        self.components = lora_components(vae)
        self.abs_sum: dict[tuple[str, str], torch.Tensor] = {}
        self.count: dict[tuple[str, str], int] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> LoraStatistics:
        for attn, projections in self.components.items():
            for proj, layer in projections:
                self._hooks.append(
                    layer.lora_A["default"].register_forward_hook(self._observer((attn, proj)))
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _observer(self, key: tuple[str, str]) -> Callable[..., None]:
        def observe(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            flat = out.detach().reshape(-1, out.shape[-1]).double()
            self.abs_sum[key] = self.abs_sum.get(key, 0) + flat.abs().sum(0)
            self.count[key] = self.count.get(key, 0) + flat.shape[0]

        return observe

    def contribution(self) -> dict[str, torch.Tensor]:
        """Per attention module, (4·rank,) contributions ``E|a_i·x|·‖b_i‖·scale``, projections in order."""
        out = {}
        for attn, projections in self.components.items():
            parts = []
            for proj, layer in projections:
                b_norm = layer.lora_B["default"].weight.detach().norm(dim=0).double()
                scale = float(layer.scaling["default"])
                parts.append(self.abs_sum[(attn, proj)] / self.count[(attn, proj)] * b_norm * scale)
            out[attn] = torch.cat(parts)
        return out

    def component_names(self, attn: str) -> list[str]:
        """``to_v/3``: projection and rank index of each entry of ``contribution()[attn]``."""
        return [
            f"{proj}/{i}"
            for proj, layer in self.components[attn]
            for i in range(layer.lora_B["default"].weight.shape[1])
        ]


@contextmanager
def lora_component_removed(vae: TransformerVAE, attn: str, index: int) -> Iterator[None]:
    """Zero one LoRA component (column of ``B``) of ``attn`` for the duration of the block."""
    offset = index
    for _proj, layer in lora_components(vae)[attn]:
        weight = layer.lora_B["default"].weight
        if offset < weight.shape[1]:
            saved = weight.data[:, offset].clone()
            weight.data[:, offset] = 0
            try:
                yield
            finally:
                weight.data[:, offset] = saved
            return
        offset -= weight.shape[1]
    raise AtomtuneError(f"{attn} has no LoRA component {index}")


# ------------------------------------------------------------------------------------- measurement


def count_for_share(contribution: dict[str, torch.Tensor], share: float) -> dict[str, int]:
    """Per module, the fewest components whose contribution reaches ``share`` of the module's total."""
    return {name: int(m.sum()) for name, m in share_masks(contribution, share, per_module=True).items()}


@torch.no_grad()
def removal_effects(
    decode: Callable[[], torch.Tensor],
    full: torch.Tensor,
    judge: DigitJudge,
    s: VaeSettings,
    removals: list[tuple[str, Callable[[], Any]]],
) -> list[dict[str, Any]]:
    """For each (label, context manager factory): P(new) and mean |Δpixel| of ``decode()`` inside it."""
    out = []
    for label, removed in removals:
        with removed():
            images = decode()
        out.append(
            {
                "removed": label,
                **judge_images(judge, images, s),
                "pixel_change": (images - full).abs().mean().item(),
            }
        )
    return out


@contextmanager
def atoms_masked(atoms: AtomModel, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    atoms.set_masks(masks)
    try:
        yield
    finally:
        atoms.reset_steering()


def measure_atoms(
    vae: TransformerVAE,
    atoms: AtomModel,
    new_images: torch.Tensor,
    z: torch.Tensor,
    judge: DigitJudge,
    s: VaeSettings,
) -> dict[str, Any]:
    """Sparsity, the atoms carrying ``s.share`` per layer, and what removing the top decoder atoms does."""
    vae.eval()
    with torch.no_grad(), AtomStatistics(atoms) as stats:
        vae.encode(new_images)
        full = vae.generate(z)
    contribution = stats.contribution()
    all_atoms = atoms.atoms()
    nonzero = sum(float(stats.nonzero[n].sum()) for n in stats.nonzero)
    total = sum(stats.tokens[n] * all_atoms[n].num_atoms for n in stats.tokens)
    counts = count_for_share(contribution, s.share)
    report = stats.report()
    top: dict[str, list[int]] = {}
    removals = []
    for name in contribution:
        if not name.startswith("decoder"):
            continue
        order = contribution[name].argsort(descending=True)[: s.top_removed].tolist()
        top[name] = order
        for position in order:
            mask = torch.ones(all_atoms[name].num_atoms)
            mask[position] = 0
            atom_id = int(all_atoms[name].atom_ids[position])
            removals.append(
                (f"{name} atom {atom_id}", lambda name=name, mask=mask: atoms_masked(atoms, {name: mask}))
            )
    keep = share_masks(contribution, s.share, per_module=True)
    removals.append((f"all but the {s.share:.0%} atoms", lambda: atoms_masked(atoms, keep)))
    effects = removal_effects(lambda: vae.generate(z), full, judge, s, removals)
    return {
        **judge_images(judge, full, s),
        "trainable_parameters": atoms.num_trainable_parameters(),
        "zero_coefficient_share": 1 - nonzero / total,
        "active_atoms_per_token": {n: float(stats.frequency()[n].sum()) for n in stats.tokens},
        "components_per_layer": {n: all_atoms[n].num_atoms for n in contribution},
        "components_for_share": counts,
        "contribution": {n: report[n]["contribution"] for n in report},
        "component_ids": {n: report[n]["atom_ids"] for n in report},
        "removal": effects,
        "_full": full,
    }


def measure_lora(
    vae: TransformerVAE, new_images: torch.Tensor, z: torch.Tensor, judge: DigitJudge, s: VaeSettings
) -> dict[str, Any]:
    """The same measures for LoRA, its rank-one components in place of atoms."""
    vae.eval()
    with torch.no_grad(), LoraStatistics(vae) as stats:
        vae.encode(new_images)
        full = vae.generate(z)
    contribution = stats.contribution()
    counts = count_for_share(contribution, s.share)
    removals = []
    ranked: dict[str, list[str]] = {}
    values: dict[str, list[float]] = {}
    for name, c in contribution.items():
        order = c.argsort(descending=True)
        names = stats.component_names(name)
        ranked[name] = [names[i] for i in order.tolist()]
        values[name] = c[order].tolist()
        if name.startswith("decoder"):
            for i in order[: s.top_removed].tolist():
                removals.append(
                    (f"{name} LoRA {names[i]}", lambda name=name, i=i: lora_component_removed(vae, name, i))
                )
    effects = removal_effects(lambda: vae.generate(z), full, judge, s, removals)
    return {
        **judge_images(judge, full, s),
        "trainable_parameters": sum(p.numel() for p in vae.parameters() if p.requires_grad),
        "components_per_layer": {n: len(c) for n, c in contribution.items()},
        "components_for_share": counts,
        "contribution": values,
        "component_ids": ranked,
        "removal": effects,
        "_full": full,
    }


# ------------------------------------------------------------------------------------------- output


def _figure(rows: list[tuple[str, torch.Tensor]]) -> bytes:
    """One row of decoded samples per (label, images (n, 1, 28, 28))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = rows[0][1].shape[0]
    fig = Figure(figsize=(2.6 + 0.9 * n, 0.95 * len(rows) + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), 1)
    for r, (label, images) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        strip = torch.cat([F.pad(img[0], (1, 1, 1, 1), value=0.5) for img in images], dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    new, old = s["new_digit"], s["old_digit"]
    share = f"{s['share']:.0%}"
    lines = [
        f"# Transformer VAE: {old} → {new} (data: {r['data']['source']}, seed {s['seed']})",
        "",
        f"Judge: held-out accuracy {r['judge']['held_out_accuracy']:.3f} on {r['data']['held_out']} real digits.",
        f"Samples judged per model: {s['samples']} (z ~ N(0, I), the same z for every model).",
        "",
        f"| model | trainable params | P({new}) | judged {new} | P({old}) | zero coefficients | "
        f"components for {share} per layer (of per layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    p = r["pretrained"]
    lines.append(
        f"| pretrained on {old} | 0 | {p['p_new']:.3f} | {p['share_judged_new']:.2f} | {p['p_old']:.3f} | – | – |"
    )
    for key, label in (("atoms", "atoms"), ("lora", "LoRA")):
        m = r[key]
        counts = ", ".join(f"{n.replace('.attn', '')} {c}" for n, c in m["components_for_share"].items())
        per = sorted(set(m["components_per_layer"].values()))
        zero = f"{m['zero_coefficient_share']:.3f}" if "zero_coefficient_share" in m else "– (dense)"
        lines.append(
            f"| {label} | {m['trainable_parameters']} | {m['p_new']:.3f} | {m['share_judged_new']:.2f} | "
            f"{m['p_old']:.3f} | {zero} | {counts} (of {'/'.join(map(str, per))}) |"
        )
    lines += [
        "",
        f"Removing one top component from a decoder layer (P({new}) with it removed; mean |Δpixel|):",
        "",
    ]
    lines += ["| method | removed | P(" + str(new) + ") | judged " + str(new) + " | mean abs pixel change |"]
    lines += ["|---|---|---|---|---|"]
    for key, label in (("atoms", "atoms"), ("lora", "LoRA")):
        for e in r[key]["removal"]:
            lines.append(
                f"| {label} | {e['removed']} | {e['p_new']:.3f} | {e['share_judged_new']:.2f} | "
                f"{e['pixel_change']:.4f} |"
            )
    sec = r["seconds"]
    lines += [
        "",
        f"Run time: {sec['total']:.0f} s wall, {sec['cpu_total']:.0f} s CPU ({r['environment']['threads']} threads).",
        "",
    ]
    return "\n".join(lines)


def run_vae(settings: VaeSettings, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Pretrain, fine-tune with atoms and with LoRA, measure; write ``vae.json``, ``vae.md``, ``vae.png``.

    Returns the dict written to ``vae.json``: ``settings``, ``data``, ``judge``, ``pretrained``,
    ``atoms``, ``lora`` (see ``measure_atoms`` / ``measure_lora``), ``seconds`` per stage and in all.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    s = settings
    s.validate()
    out_dir = Path(out_dir)
    images, labels = load_digit_images(s.data, s.mnist_dir)
    train_idx, held_idx = split_per_class(labels, s.seed, cap=s.images_per_class)
    old_images = images[train_idx][labels[train_idx] == s.old_digit]
    new_images = images[train_idx][labels[train_idx] == s.new_digit]
    if len(old_images) == 0 or len(new_images) == 0:
        raise AtomtuneError(f"the data have no training images of digit {s.old_digit} or {s.new_digit}")
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    judge, _ = train_judge(images[train_idx], labels[train_idx], s, progress)
    with torch.no_grad():
        held_acc = (judge(images[held_idx]).argmax(-1) == labels[held_idx]).float().mean().item()
    seconds["judge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    vae = TransformerVAE(s)
    pre_losses = train(
        vae.loss, list(vae.parameters()), old_images, s, s.pretrain_steps, "pretrain", progress
    )
    vae.eval()
    seconds["pretrain"] = time.perf_counter() - t0
    z = torch.randn(s.samples, s.latent, generator=torch.Generator().manual_seed(s.seed + 5))
    base_images = vae.generate(z)
    result: dict[str, Any] = {
        "settings": asdict(s),
        "data": {
            "source": s.data,
            "train_old": len(old_images),
            "train_new": len(new_images),
            "judge_train": len(train_idx),
            "held_out": len(held_idx),
        },
        "judge": {"held_out_accuracy": held_acc, "real_new_digit": judge_images(judge, new_images, s)},
        "pretrained": judge_images(judge, base_images, s) | {"final_loss": _tail(pre_losses)},
    }

    t0 = time.perf_counter()
    atom_vae = copy.deepcopy(vae)
    atoms = add_atoms(atom_vae, s)
    atom_vae.train()

    def atom_loss(x: torch.Tensor) -> torch.Tensor:
        return atom_vae.loss(x) + atoms.regularization_loss()

    losses = train(
        atom_loss, atoms.trainable_parameters(), new_images, s, s.finetune_steps, "atoms", progress
    )
    seconds["atoms"] = time.perf_counter() - t0
    result["atoms"] = measure_atoms(atom_vae, atoms, new_images, z, judge, s) | {"final_loss": _tail(losses)}

    t0 = time.perf_counter()
    lora_vae = add_lora(copy.deepcopy(vae), s)
    lora_vae.train()
    params = [p for p in lora_vae.parameters() if p.requires_grad]
    losses = train(lora_vae.loss, params, new_images, s, s.finetune_steps, "lora", progress)
    seconds["lora"] = time.perf_counter() - t0
    result["lora"] = measure_lora(lora_vae, new_images, z, judge, s) | {"final_loss": _tail(losses)}

    k = min(s.figure_samples, s.samples)
    rows = [(f"pretrained ({s.old_digit})", base_images[:k]), ("atoms", result["atoms"]["_full"][:k])]
    rows += _removal_rows(atom_vae, lambda: atom_vae.generate(z[:k]), atoms, result["atoms"], s)
    rows.append(("LoRA", result["lora"]["_full"][:k]))
    rows += _lora_rows(lora_vae, lambda: lora_vae.generate(z[:k]), result["lora"], s)
    png = _figure(rows)
    for key in ("atoms", "lora"):
        del result[key]["_full"]
    seconds["total"] = time.perf_counter() - start
    seconds["cpu_total"] = time.process_time() - cpu_start  # all threads; wall time varies with load
    result["seconds"] = seconds
    result["environment"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    text = json.dumps(result, indent=1) + "\n"
    markdown = _markdown(result)
    atomic_write(out_dir / "vae.png", lambda p: p.write_bytes(png))
    atomic_write(out_dir / "vae.md", lambda p: p.write_text(markdown))
    atomic_write(out_dir / "vae.json", lambda p: p.write_text(text))
    return result


def _tail(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 20) :]
    return sum(tail) / len(tail) if tail else math.nan


@torch.no_grad()
def _removal_rows(
    vae: TransformerVAE,
    decode: Callable[[], torch.Tensor],
    atoms: AtomModel,
    m: dict[str, Any],
    s: VaeSettings,
) -> list[tuple[str, torch.Tensor]]:
    rows = []
    all_atoms = atoms.atoms()
    for e in m["removal"]:
        if " atom " not in e["removed"]:
            continue
        name, _, atom_id = e["removed"].partition(" atom ")
        position = int((all_atoms[name].atom_ids == int(atom_id)).nonzero()[0])
        mask = torch.ones(all_atoms[name].num_atoms)
        mask[position] = 0
        with atoms_masked(atoms, {name: mask}):
            rows.append(
                (f"− {e['removed'].replace('.attn', '')}\nP({s.new_digit}) {e['p_new']:.2f}", decode())
            )
    return rows


@torch.no_grad()
def _lora_rows(
    vae: TransformerVAE, decode: Callable[[], torch.Tensor], m: dict[str, Any], s: VaeSettings
) -> list[tuple[str, torch.Tensor]]:
    rows = []
    for e in m["removal"]:
        name, _, component = e["removed"].partition(" LoRA ")
        index = LoraStatistics(vae).component_names(name).index(component)
        with lora_component_removed(vae, name, index):
            rows.append(
                (f"− {e['removed'].replace('.attn', '')}\nP({s.new_digit}) {e['p_new']:.2f}", decode())
            )
    return rows
