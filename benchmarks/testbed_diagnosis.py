"""Diagnosis of one testbed adapter (never a way to choose a setting): where its concept fails, and
whether an importance ranks its atoms.

    python benchmarks/testbed_diagnosis.py --out runs/diagnosis --seed 0 --lr 1e-4
    python benchmarks/testbed_diagnosis.py --out runs/halves-seed0 --adapter runs/bench/runs/atoms/lr-0.0001/seed-0/adapter

Trains the recipe (``cz.RECIPE_NUM_ATOMS`` per projection cut to ``cz.RECIPE_BUDGET``) on the
benchmark's data at ``--seed`` (or loads ``--adapter`` and skips the per-prompt part), then writes
``OUT/diagnosis.json`` with

- ``per_prompt``: P(target) of every one of the 30 prompts (selection and report) over sampling
  seeds 0-3, each marked as a selection prompt or an instance caption;
- ``global_halves``: P(target) on the report prompts (sampling seeds 0-1) of the full adapter, of
  its top half of live atoms ranked by contribution over all modules together, and of two random
  halves drawn over all modules, with how many kept atoms each projection kind gets;
- ``loss_halves``: the same halves ranked by each atom's effect on the concept's training loss
  (``-∂L/∂gain``: the first-order rise of the denoising loss on the instance images when the atom is
  removed), which is in the loss's units and so compares atoms of different modules; over all
  modules together and within each module.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from atomtune.core.selection import global_top_k_masks, top_k_masks
from atomtune.diffusion.adapters import load_adapters
from atomtune.diffusion.pipeline import pipeline_name
from atomtune.diffusion.spec import spec_for
from atomtune.testbed import behaviour as bh
from atomtune.testbed import customize as cz
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.judges import fidelity, load_classifier
from atomtune.workflows.analyze import calibrate


def per_prompt(pipe, classifier, references) -> list[dict]:
    prompts, seeds = cz.all_prompts(), [0, 1, 2, 3]
    images = cz.draw(pipe, [p.text for p in prompts], seeds)
    p = fidelity(classifier, images, 9, (references + 1) / 2)["p_target"].view(len(prompts), len(seeds))
    chosen, captions = {q.text for q in cz.selection_prompts()}, set(cz.instance_captions(9, 5))
    return [
        {"prompt": q.text, "p": float(v), "sel": q.text in chosen, "train_caption": q.text in captions}
        for q, v in zip(prompts, p.mean(1), strict=True)
    ]


def global_halves(pipe, classifier, references, adapter: Path) -> dict:
    tuned = load_adapters(pipe.transformer, [adapter], pipeline_name(pipe))
    try:
        ranking = list(dict.fromkeys(cz.instance_captions(9, 5))) + [p.text for p in cz.selection_prompts()]
        stats, _ = calibrate(spec_for(pipe), tuned, ranking, [0], cz.SAMPLE_STEPS, cz.GUIDANCE, 24, 24)
        live = {n: (a.mask != 0).cpu() for n, a in tuned.handle.atoms().items()}
        contribution = {n: c * live[n] for n, c in stats.contribution().items()}
        half = sum(int(m.sum()) for m in live.values()) // 2

        def score(masks) -> float:
            tuned.handle.set_masks({n: m & live[n] for n, m in masks.items()})
            return cz.score_concept(pipe, cz.report_prompts(), [0, 1], 9, references, classifier)[0][
                "p_target"
            ]

        generator = torch.Generator().manual_seed(0)
        randoms = []
        for _ in range(2):
            randoms.append(score(global_top_k_masks(bh.random_importance(live, generator), half)))
        top = global_top_k_masks(contribution, half)
        kept = Counter()
        for name, mask in top.items():
            kept[name.split(".", 2)[2]] += int(mask.sum())
        return {
            "modules": len(live), "live": 2 * half, "full": score(live), "global_top_half": score(top),
            "global_random_half": randoms, "kept_by_kind": dict(kept),
        }  # fmt: skip
    finally:
        tuned.unload()


def loss_importance(pipe, tuned, references: torch.Tensor, draws: int = 16) -> dict[str, torch.Tensor]:
    """Per atom, ``-∂L/∂gain`` at gain 1: how much the denoising loss on the instance images (under
    their captions; noise and timesteps drawn ``draws`` times) rises, to first order, without it."""
    spec = spec_for(pipe)
    mean, std = spec.encode_images(references)
    prompts = spec.encode_prompts(cz.instance_captions(9, len(references)))
    atoms = tuned.handle.atoms()
    gains = [a.gain.requires_grad_(True) for a in atoms.values()]
    total = [torch.zeros_like(g) for g in gains]
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(draws):
            latents = spec.latents(mean, std, torch.randn(mean.shape, generator=generator))
            noised = spec.add_noise(latents, torch.randn(latents.shape, generator=generator), generator)
            pred = spec.predict_noise(pipe.transformer, noised.noisy, noised.timesteps, prompts)
            for t, g in zip(total, torch.autograd.grad(noised.loss(pred), gains), strict=True):
                t -= g / draws
    finally:
        for g in gains:
            g.requires_grad_(False)
    return dict(zip(atoms, total, strict=True))


def loss_halves(pipe, classifier, references, adapter: Path) -> dict:
    tuned = load_adapters(pipe.transformer, [adapter], pipeline_name(pipe))
    try:
        importance = loss_importance(pipe, tuned, references)
        live = {n: (a.mask != 0).cpu() for n, a in tuned.handle.atoms().items()}
        ranked = {n: torch.where(live[n], v.double(), float("-inf")) for n, v in importance.items()}
        half = sum(int(m.sum()) for m in live.values()) // 2
        per_module = {n: int(m.sum()) // 2 for n, m in live.items()}

        def score(masks) -> float:
            tuned.handle.set_masks({n: m & live[n] for n, m in masks.items()})
            return cz.score_concept(pipe, cz.report_prompts(), [0, 1], 9, references, classifier)[0][
                "p_target"
            ]

        def module_top(values) -> dict:
            return {n: top_k_masks({n: values[n]}, per_module[n])[n] for n in values}

        generator = torch.Generator().manual_seed(0)
        randoms = [bh.random_importance(live, generator) for _ in range(2)]
        record = {
            "live": 2 * half, "full": score(live),
            "global_top_half": score(global_top_k_masks(ranked, half)),
            "global_random_half": [score(global_top_k_masks(r, half)) for r in randoms],
            "module_top_half": score(module_top(ranked)),
            "module_random_half": [score(module_top(r)) for r in randoms],
        }  # fmt: skip
        top = global_top_k_masks(ranked, half)
        kept = Counter()
        for name, mask in top.items():
            kept[name.split(".", 2)[2]] += int(mask.sum())
        record["kept_by_kind"] = dict(kept)
        return record
    finally:
        tuned.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--adapter", help="a trained testbed adapter: only its halves, no training")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    pipe, classifier = digit_pipeline(), load_classifier()
    references = cz.instance_images(9, 5)
    if args.adapter:
        adapter = Path(args.adapter)
        record = {
            "adapter": str(adapter),
            "global_halves": global_halves(pipe, classifier, references, adapter),
        }
        record["loss_halves"] = loss_halves(pipe, classifier, references, adapter)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnosis.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: record[k] for k in ("global_halves", "loss_halves")}))
        return
    instance = cz.write_images(references, out / "instance", cz.instance_captions(9, 5))
    prior = cz.prior_images(pipe, 9, out / "prior", 4)
    run_dir = out / f"recipe_seed-{args.seed}_lr-{args.lr:g}"
    result = cz.train_adapter(
        pipe, "atoms", instance, cz.INSTANCE_PROMPT, run_dir, args.lr, 600, args.seed, cz.RECIPE_NUM_ATOMS,
        class_dir=prior, atom_budget=cz.RECIPE_BUDGET,
    )  # fmt: skip
    record = {"seed": args.seed, "lr": args.lr, "per_prompt": per_prompt(pipe, classifier, references)}
    result.tuned.unload()
    record["global_halves"] = global_halves(pipe, classifier, references, result.adapter_dir)
    record["loss_halves"] = loss_halves(pipe, classifier, references, result.adapter_dir)
    (out / "diagnosis.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["global_halves"]))


if __name__ == "__main__":
    main()
