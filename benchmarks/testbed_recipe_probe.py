"""Probe: which atom recipe keeps the testbed concept, on the selection seed and prompts only (never
the benchmark's report prompts), with the benchmark's data: 5 captioned instance images of the
held-out digit and prior preservation with 4 of the model's own drawings per other digit.

    python benchmarks/testbed_recipe_probe.py --out runs/recipe-probe \\
        --run proj-15 --run proj-64-cut-6 --run lora --seed 100

``--prompts report`` judges on the benchmark's 25 report prompts instead: a diagnosis of a
benchmark figure (what a setting would have scored there), never a way to choose one.

Each ``--run NAME`` (a key of ``RECIPES``) appends one JSON line to ``OUT/results.jsonl``: P(target),
feature cosine and alignment on the 5 selection prompts x 2 sampling seeds, prior kept, trainable
parameters of the shipped adapter, and the atoms active per token in the last tenth of training
(absolute, and as a share of the starting dictionary). A run already in the file is skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from atomtune.io import read_json
from atomtune.testbed import customize as cz
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.judges import load_classifier

#: name: (method, form, atoms per module at the start, atoms kept, further AtomConfig fields)
RECIPES = {
    "lora": ("lora", "projections", 0, 0, {}),
    "attention-66-cut-6": ("atoms", "attention", 66, 6, {}),  # the paper's form, the old recipe
    "proj-15": ("atoms", "projections", 15, 0, {}),  # parity with LoRA r16, no cut
    "proj-64-cut-15": ("atoms", "projections", 64, 15, {}),
    "proj-64-cut-6": ("atoms", "projections", 64, 6, {}),
    "proj-150-cut-15": ("atoms", "projections", 150, 15, {}),
    "proj-15-cut-4": ("atoms", "projections", 15, 4, {}),
    "proj-64-topk-6": ("atoms", "projections", 64, 0, {"shrinkage": "topk", "topk": 6}),
    "proj-64-cut-15-late": ("atoms", "projections", 64, 15, {"prune_at": [0.5, 0.75]}),
    "proj-64-cut-15-flat": ("atoms", "projections", 64, 15, {"lr_exponent": 0.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", action="append", required=True, choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=100, help="training seed (default: the selection seed)")
    parser.add_argument("--lr", type=float, default=cz.RECIPE_LR)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", choices=("selection", "report"), default="selection")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["run"], r["seed"], r["lr"], r["steps"], r.get("prompts", "selection")) for r in _read(results)}
    judged = cz.report_prompts() if args.prompts == "report" else cz.selection_prompts()
    pipe, classifier = digit_pipeline(), load_classifier()
    references = cz.instance_images(9, 5)
    instance = cz.write_images(references, out / "instance", cz.instance_captions(9, 5))
    prior = cz.prior_images(pipe, 9, out / "prior", 4)
    for name in args.run:
        if (name, args.seed, args.lr, args.steps, args.prompts) in done:
            continue
        method, form, num_atoms, budget, atoms = RECIPES[name]
        began = time.perf_counter()
        run_dir = out / f"{name}_seed-{args.seed}_lr-{args.lr:g}_steps-{args.steps}"
        result = cz.train_adapter(
            pipe, method, instance, cz.INSTANCE_PROMPT, run_dir, args.lr, args.steps, args.seed,
            max(num_atoms, 1), class_dir=prior, atom_budget=budget, atoms=atoms, form=form,
        )  # fmt: skip
        scores, _ = cz.score_concept(pipe, judged, [0, 1], 9, references, classifier)
        scores["prior"] = cz.score_prior(pipe, 9, [0, 1], classifier)
        params = result.tuned.num_trainable_parameters()
        result.tuned.unload()
        sparsity = read_json(result.adapter_dir / "training.json", "training record").get("sparsity") or {}
        record = {
            "run": name, "seed": args.seed, "lr": args.lr, "steps": args.steps, "prompts": args.prompts, **scores,
            "trainable_params": params, **sparsity,
            "active_share_of_start": sparsity.get("active_per_token", 0) / num_atoms if num_atoms else None,
            "seconds": time.perf_counter() - began,
        }  # fmt: skip
        print(json.dumps(record), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _read(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


if __name__ == "__main__":
    main()
