"""Probe: which atom form teaches the VAE the new digit, at LoRA r8's parameters, on seeds 0 1 2.

    python benchmarks/vae_forms_probe.py --out benchmarks/results/vae/forms.json

The experiment's judge, pretraining and fine-tuning loop (``atomtune experiment vae`` defaults), then
four fine-tunes of the same pretrained model: atoms on the four projections (8 each), the paper's
attention atoms (32 per module), both at once at the same total (16 per module on the value path
plus 4 per projection: two handles on one model, trained together), and LoRA r8 on the projections.
Writes P(new digit) per seed and the mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from atomtune.core.model import AtomModel
from atomtune.experiments.digit_data import load_digit_images, split_per_class
from atomtune.experiments.vae.finetuning import add_lora, atom_config
from atomtune.experiments.vae.judge import judge_images, train_judge
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.settings import VaeSettings
from atomtune.experiments.vae.training import train
from atomtune.io import save_json

FORMS = {  # name: [(form, atoms per module)], one handle each
    "projections, 8 per projection": [("projections", 8)],
    "attention, 32 per module": [("attention", 32)],
    "attention 16 + projections 4": [("attention", 16), ("projections", 4)],
}


def fine_tune(vae: TransformerVAE, s: VaeSettings, images: torch.Tensor, parts) -> tuple[float, int]:
    tuned = copy.deepcopy(vae)
    torch.manual_seed(s.seed + 11)
    handles = [
        AtomModel(tuned, atom_config(s.replace(form=f, num_atoms=n)), adapter_name=f"a{i}")
        for i, (f, n) in enumerate(parts)
    ]
    params = _train_together(handles)
    tuned.train()
    penalties = handles[0]  # its terms cover every active layer of the model, both handles' alike
    weights = {
        (c.sparsity_weight, c.orthogonality_weight) for c in (h.configs[h.active_adapter] for h in handles)
    }
    if len(weights) > 1:
        raise SystemExit("the handles' penalty weights differ; one penalty term cannot stand for both")

    def loss(x: torch.Tensor) -> torch.Tensor:
        return tuned.loss(x) + penalties.regularization_loss()

    train(loss, params, images, s, s.finetune_steps, "atoms", False)
    return tuned.eval(), sum(p.numel() for p in params)


def _train_together(handles: list[AtomModel]) -> list[torch.nn.Parameter]:
    """Every handle's layers active and its tensors trainable. A later handle freezes every parameter
    it finds and, in ``set_adapter``, silences the layers whose adapters it lacks (the earlier
    handle's), so both are set again here, layer by layer."""
    for h in handles:
        for layer in h.layers().values():
            if h.active_adapter in layer.adapters:
                layer.active_adapter = h.active_adapter
    params = []
    for h in handles:
        learn_lambda = h.configs[h.active_adapter].learn_lambda
        for atoms in h.atoms().values():
            for name, p in atoms.named_parameters():
                if name != "lam" or learn_lambda:
                    params.append(p.requires_grad_(True))
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    for seed in args.seeds:
        s = VaeSettings(seed=seed)
        images, labels = load_digit_images(s.data, s.mnist_dir)
        train_idx, _ = split_per_class(labels, s.seed, cap=s.images_per_class)
        old = images[train_idx][labels[train_idx] == s.old_digit]
        new = images[train_idx][labels[train_idx] == s.new_digit]
        judge, _ = train_judge(images[train_idx], labels[train_idx], s, False)
        torch.manual_seed(s.seed)
        vae = TransformerVAE(s)
        train(vae.loss, list(vae.parameters()), old, s, s.pretrain_steps, "pretrain", False)
        vae.eval()
        z = torch.randn(s.samples, s.latent, generator=torch.Generator().manual_seed(s.seed + 5))
        for name, parts in FORMS.items():
            tuned, count = fine_tune(vae, s, new, parts)
            with torch.no_grad():
                p = judge_images(judge, tuned.generate(z), s)["p_new"]
            rows.setdefault(name, {"params": count, "p_new": {}})["p_new"][seed] = p
        lora = add_lora(copy.deepcopy(vae), s).train()
        train(
            lora.loss,
            [p for p in lora.parameters() if p.requires_grad],
            new,
            s,
            s.finetune_steps,
            "lora",
            False,
        )
        with torch.no_grad():
            p = judge_images(judge, lora.eval().generate(z), s)["p_new"]
        count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        rows.setdefault("LoRA r8 on the projections", {"params": count, "p_new": {}})["p_new"][seed] = p
        print(seed, {k: round(v["p_new"][seed], 3) for k, v in rows.items()}, flush=True)
    for row in rows.values():
        values = list(row["p_new"].values())
        row["mean"] = statistics.fmean(values)
        row["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    save_json({"seeds": args.seeds, "rows": rows}, Path(args.out))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
