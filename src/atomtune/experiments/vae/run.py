"""One run of the VAE experiment: judge, pretrain on the old digit, fine-tune with atoms and with LoRA,
measure both, and write ``vae.json``, ``vae.md`` and ``vae.png`` atomically.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError
from atomtune.experiments.digit_data import load_digit_images, split_per_class
from atomtune.experiments.run_record import environment, final_loss
from atomtune.experiments.vae.finetuning import add_atoms, add_lora
from atomtune.experiments.vae.judge import judge_images, train_judge
from atomtune.experiments.vae.measures import measure_atoms, measure_lora
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.report import atom_removal_rows, figure_png, lora_removal_rows, markdown_report
from atomtune.experiments.vae.settings import VaeSettings
from atomtune.experiments.vae.training import train
from atomtune.io import atomic_write


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
        "pretrained": judge_images(judge, base_images, s) | {"final_loss": final_loss(pre_losses)},
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
    result["atoms"] = measure_atoms(atom_vae, atoms, new_images, z, judge, s) | {
        "final_loss": final_loss(losses)
    }

    t0 = time.perf_counter()
    lora_vae = add_lora(copy.deepcopy(vae), s)
    lora_vae.train()
    params = [p for p in lora_vae.parameters() if p.requires_grad]
    losses = train(lora_vae.loss, params, new_images, s, s.finetune_steps, "lora", progress)
    seconds["lora"] = time.perf_counter() - t0
    result["lora"] = measure_lora(lora_vae, new_images, z, judge, s) | {"final_loss": final_loss(losses)}

    k = min(s.figure_samples, s.samples)
    rows = [(f"pretrained ({s.old_digit})", base_images[:k]), ("atoms", result["atoms"]["_full"][:k])]
    rows += atom_removal_rows(lambda: atom_vae.generate(z[:k]), atoms, result["atoms"], s)
    rows.append(("LoRA", result["lora"]["_full"][:k]))
    rows += lora_removal_rows(lora_vae, lambda: lora_vae.generate(z[:k]), result["lora"], s)
    png = figure_png(rows)
    for key in ("atoms", "lora"):
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
