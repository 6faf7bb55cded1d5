"""One run of the VAE experiment: judge, pretrain on the old digit, fine-tune with atoms and with LoRA,
measure both, and write ``vae.json``, ``vae.md`` and ``vae.png`` atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError
from atomtune.experiments.digit_data import load_digit_images, split_per_class
from atomtune.experiments.run_record import environment, final_loss
from atomtune.experiments.vae.finetuning import finetune_atoms, finetune_lora
from atomtune.experiments.vae.judge import judge_images, train_judge
from atomtune.experiments.vae.measures import measure_atoms, measure_lora
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.report import (
    atom_removal_rows,
    figure_png,
    lora_removal_rows,
    markdown_report,
    method_label,
)
from atomtune.experiments.vae.settings import VaeSettings
from atomtune.experiments.vae.training import train
from atomtune.io import atomic_write


def run_vae(settings: VaeSettings, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Pretrain, fine-tune with atoms and with LoRA, measure; write ``vae.json``, ``vae.md``, ``vae.png``.

    Returns the dict written to ``vae.json``: ``settings``, ``data``, ``judge``, ``pretrained``,
    ``atoms``, ``lora`` (see ``measure_atoms`` / ``measure_lora``), ``atoms_budget`` (atoms cut to
    ``s.atom_budget`` per module during fine-tuning, if set) and ``lora_budget`` (LoRA of rank
    ``s.budget_lora_rank``, if set), ``seconds`` per stage and in all.
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
        "pretrained": judge_images(judge, base_images, s) | {"final_loss": final_loss(pre_losses)},
    }

    t0 = time.perf_counter()
    atom_vae, atoms, losses = finetune_atoms(vae, s, new_images, None, progress)
    seconds["atoms"] = time.perf_counter() - t0
    result["atoms"] = measure_atoms(atom_vae, atoms, new_images, z, judge, s) | {
        "final_loss": final_loss(losses)
    }
    tuned = {"atoms": (atom_vae, atoms)}
    if s.atom_budget is not None:
        t0 = time.perf_counter()
        budget_vae, budget_atoms, losses = finetune_atoms(vae, s, new_images, s.atom_budget, progress)
        seconds["atoms_budget"] = time.perf_counter() - t0
        live = {n: int((a.mask != 0).sum()) for n, a in budget_atoms.atoms().items()}
        result["atoms_budget"] = measure_atoms(budget_vae, budget_atoms, new_images, z, judge, s) | {
            "final_loss": final_loss(losses),
            "atom_budget": s.atom_budget,
            "live_atoms": live,
            "live_parameters": sum(
                live[n] * (a.W_s.shape[0] + a.D.shape[1] + 1) for n, a in budget_atoms.atoms().items()
            ),
        }
        tuned["atoms_budget"] = (budget_vae, budget_atoms)

    t0 = time.perf_counter()
    lora_vae, losses = finetune_lora(vae, s, new_images, s.lora_rank, progress)
    seconds["lora"] = time.perf_counter() - t0
    result["lora"] = measure_lora(lora_vae, new_images, z, judge, s) | {"final_loss": final_loss(losses)}
    loras = {"lora": lora_vae}
    if s.budget_lora_rank is not None:
        t0 = time.perf_counter()
        small_vae, losses = finetune_lora(vae, s, new_images, s.budget_lora_rank, progress)
        seconds["lora_budget"] = time.perf_counter() - t0
        result["lora_budget"] = measure_lora(small_vae, new_images, z, judge, s) | {
            "final_loss": final_loss(losses),
            "rank": s.budget_lora_rank,
        }
        loras["lora_budget"] = small_vae

    k = min(s.figure_samples, s.samples)
    rows = [(f"pretrained ({s.old_digit})", base_images[:k])]
    for key, (model, handle) in tuned.items():
        rows.append((method_label(result, key), result[key]["_full"][:k]))
        rows += atom_removal_rows(lambda m=model: m.generate(z[:k]), handle, result[key], s)
    for key, model in loras.items():
        rows.append((method_label(result, key), result[key]["_full"][:k]))
        rows += lora_removal_rows(model, lambda m=model: m.generate(z[:k]), result[key], s)
    png = figure_png(rows)
    for key in (*tuned, *loras):
        del result[key]["_full"]
    seconds["total"] = time.perf_counter() - start
    seconds["cpu_total"] = time.process_time() - cpu_start  # all threads; wall time varies with load
    result["seconds"] = seconds
    result["environment"] = environment()
    text = json.dumps(result, indent=1) + "\n"
    markdown = markdown_report(result)
    atomic_write(out_dir / "vae.png", lambda p: p.write_bytes(png))
    atomic_write(out_dir / "vae.md", lambda p: p.write_text(markdown))
    atomic_write(out_dir / "vae.json", lambda p: p.write_text(text))
    return result
