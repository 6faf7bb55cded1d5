"""Probe: the demo's recipe (dictionary, budget, rate, steps) chosen on the selection split, never on
the 25 report prompts the demo shows. Same data as ``atomtune demo``: the 5 captioned instance images
of the 9, prior preservation with 2 of the pretrained model's drawings per other digit.

    python benchmarks/demo_recipe_probe.py --out runs/demo-select \\
        --run 64:6:3e-4:300 --run 16:4:3e-4:300 --seed 100 --seed 101

Each ``--run NUM_ATOMS:BUDGET:LR:STEPS`` x ``--seed`` (training seeds; default 100, the selection
seed) appends one JSON line to ``OUT/results.jsonl``: P(target), feature cosine, alignment on the 5
selection prompts x sampling seeds 1-4, prior kept (18 prompts x seeds 1, 2), trainable parameters
and training seconds. Runs already in the file are skipped, so an interrupted probe resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from atomtune.testbed import customize as cz
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.judges import load_classifier

TARGET = 9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", action="append", required=True, help="NUM_ATOMS:BUDGET:LR:STEPS")
    parser.add_argument("--seed", type=int, action="append", help="training seed (repeatable; default 100)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = [json.loads(line)["config"] for line in results.open()] if results.exists() else []
    pipe, classifier = digit_pipeline(), load_classifier()
    references = cz.instance_images(TARGET)
    instance = cz.write_images(references, out / "instance_images", cz.instance_captions(TARGET))
    prior = cz.prior_images(pipe, TARGET, out / "prior_images", 2)
    for seed in args.seed or [100]:
        for spec in args.run:
            atoms, budget, lr, steps = spec.split(":")
            config = {"num_atoms": int(atoms), "budget": int(budget), "lr": float(lr), "steps": int(steps)}
            config["seed"] = seed
            if config in done:
                continue
            shutil.rmtree(out / "run", ignore_errors=True)
            result = cz.train_adapter(
                pipe, "atoms", instance, cz.INSTANCE_PROMPT, out / "run", config["lr"], config["steps"],
                seed, config["num_atoms"], atom_budget=config["budget"], class_dir=prior,
            )  # fmt: skip
            try:
                scores, _ = cz.score_concept(
                    pipe, cz.selection_prompts(), [1, 2, 3, 4], TARGET, references, classifier
                )
                scores["prior"] = cz.score_prior(pipe, TARGET, [1, 2], classifier)
                scores["params"] = result.tuned.num_trainable_parameters()
            finally:
                result.tuned.unload()
            record = {
                "config": config,
                **scores,
                "train_seconds": result.seconds,
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(record), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
