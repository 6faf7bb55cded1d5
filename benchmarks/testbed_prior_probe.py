"""Probe: the testbed concept with prior preservation, one run per setting, judged on the selection
seed and prompts (never the benchmark's report prompts). Prior preservation uses the pretrained
model's own drawings of the other digits under their captions (``customize.prior_images``).

    python benchmarks/testbed_prior_probe.py --out runs/prior-probe \\
        --run atoms:1e-3:600 --run atoms:1e-3:300 --run lora:1e-3:300 --run atoms-dense:1e-3:300

Each ``--run METHOD:LR:STEPS`` (METHOD: atoms (the recipe, 66 atoms cut to 6), atoms-dense (no
cut), lora, dora, oft) appends one JSON line to ``OUT/results.jsonl``: P(target), feature cosine,
alignment on the 5 selection prompts x 4 seeds, and prior kept (18 prompts x 2 seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from atomtune.testbed import customize as cz
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.judges import load_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--run", action="append", required=True, help="METHOD:LR:STEPS")
    parser.add_argument("--seed", type=int, default=100, help="training seed (default: the selection seed)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    pipe, classifier = digit_pipeline(), load_classifier()
    references = cz.instance_images(9)
    instance = cz.write_images(references, out / "instance")
    prior = cz.prior_images(pipe, 9, out / "prior", per_digit=4)
    for spec in args.run:
        method, lr, steps = spec.split(":")
        began = time.perf_counter()
        result = cz.train_adapter(
            pipe, method.split("-")[0], instance, cz.INSTANCE_PROMPT, out / spec.replace(":", "_"),
            float(lr), int(steps), args.seed, 66, class_dir=prior,
            atom_budget=0 if method == "atoms-dense" else cz.RECIPE_BUDGET,
        )  # fmt: skip
        scores, _ = cz.score_concept(pipe, cz.selection_prompts(), [0, 1, 2, 3], 9, references, classifier)
        scores["prior"] = cz.score_prior(pipe, 9, [0, 1], classifier)
        result.tuned.unload()
        record = {"run": spec, **scores, "seconds": time.perf_counter() - began}
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
