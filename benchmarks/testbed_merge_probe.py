"""Probe: ways to merge the testbed's concept and style adapters, judged on sampling seeds the
benchmark does not report (its merge draws seeds 0-7).

    python benchmarks/testbed_merge_probe.py --out runs/merge-probe --bench runs/bench --seed 100

Concept and style adapters of training seed SEED come from the benchmark's folder where it kept
them (``BENCH/runs/{atoms,lora}/lr-*/seed-SEED``; on seed 0, its report pair, also its style
adapters), else they are trained here with the benchmark's data, recipe and rates. Each variant
appends one JSON line to ``OUT/results.jsonl``: P(target) on "a large/small sks digit, zwx style" over ``--samples``
sampling seeds from 100, the style share, and the share of its concept-only P(target) kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from atomtune.core.model import AtomModel
from atomtune.diffusion.adapters import load_adapters
from atomtune.diffusion.pipeline import pipeline_name
from atomtune.testbed import customize as cz
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.judges import fidelity, load_classifier

RATES = {"atoms": 1e-4, "lora": 3e-4}  # the benchmark's chosen rates (benchmarks/results/testbed)


def concept_adapter(pipe, method: str, seed: int, out: Path, bench: Path) -> Path:
    """The benchmark's own run where it kept its adapter, else trained here the way it trains."""
    kept = bench / "runs" / method / f"lr-{RATES[method]:g}" / f"seed-{seed}" / "adapter"
    if kept.is_dir():
        return kept
    run = out / f"concept-{method}-seed-{seed}"
    if not (run / "adapter").is_dir():
        captions = cz.instance_captions(9, 5)
        instance = cz.write_images(cz.instance_images(9, 5), out / "instance_images", captions)
        cz.train_adapter(
            pipe, method, instance, cz.INSTANCE_PROMPT, run, RATES[method], 600, seed,
            cz.RECIPE_NUM_ATOMS, atom_budget=cz.RECIPE_BUDGET, class_dir=bench / "prior_images",
        ).tuned.unload()  # fmt: skip
    return run / "adapter"


def style_adapter(pipe, method: str, seed: int, out: Path, bench: Path) -> Path:
    """The benchmark's own style adapter on its report seed 0, else trained here the way it trains."""
    kept = bench / "merge" / ("style" if method == "atoms" else f"style-{method}") / "adapter"
    if seed == 0 and kept.is_dir():
        return kept
    run = out / f"style-{method}-seed-{seed}"
    if not (run / "adapter").is_dir():
        style = cz.write_images(cz.style_images(9, 5), out / "style_images")
        cz.train_adapter(
            pipe, method, style, cz.STYLE_PROMPT, run, RATES[method], 600, seed,
            cz.RECIPE_NUM_ATOMS, atom_budget=cz.RECIPE_BUDGET, class_dir=bench / "prior_images",
        ).tuned.unload()  # fmt: skip
    return run / "adapter"


def scale_gains(handle: AtomModel, name: str, weight: float) -> None:
    """Scale all of adapter ``name``'s atoms (their gains) by ``weight``."""
    with torch.no_grad():
        for atoms in handle.atoms(name).values():
            atoms.gain.mul_(weight)


def average_shared_encoders(handle: AtomModel, first: str, second: str) -> None:
    """Before a ``sum``: atoms both adapters kept get the mean of the two encoders (so that the sum
    doubles neither), each adapter's half."""
    with torch.no_grad():
        a, b = handle.atoms(first), handle.atoms(second)
        for module in a:
            ia, ib = a[module].atom_ids.tolist(), b[module].atom_ids.tolist()
            for atom in set(ia) & set(ib) - {-1}:
                pa, pb = ia.index(atom), ib.index(atom)
                mean = (a[module].W_s[:, pa] + b[module].W_s[:, pb]) / 2
                a[module].W_s[:, pa] = mean / 2
                b[module].W_s[:, pb] = mean / 2


def draw_scores(pipe, classifier, references, seeds: list[int]) -> dict:
    prompts = [f"a {size} {cz.SUBJECT}, {cz.STYLE_TOKEN} style" for size in ("large", "small")]
    images = cz.draw(pipe, prompts, seeds)
    fid = fidelity(classifier, images, 9, (references + 1) / 2)
    return {"p_target": fid["p_target"].mean().item(), "style": cz.style_share(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--bench", required=True, help="a testbed bench folder with its runs")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--variant", action="append", help="only these variants (default: all)")
    args = parser.parse_args()
    out, bench = Path(args.out), Path(args.bench)
    out.mkdir(parents=True, exist_ok=True)
    pipe, classifier = digit_pipeline(), load_classifier()
    references = cz.instance_images(9)
    seeds = list(range(100, 100 + args.samples))
    folders = {
        m: (concept_adapter(pipe, m, args.seed, out, bench), style_adapter(pipe, m, args.seed, out, bench))
        for m in ("atoms", "lora")
    }
    # name: (method, adapters, combine, modules where the concept acts alone, edit before merging)
    variants = {
        "atoms: concept only": ("atoms", "c", "concat", (), None),
        "atoms: style only": ("atoms", "s", "concat", (), None),
        "atoms: sum": ("atoms", "cs", "sum", (), None),
        "atoms: concat": ("atoms", "cs", "concat", (), None),
        "atoms: sum, shared encoders averaged": ("atoms", "cs", "sum", (), "average"),
        "lora: concept only": ("lora", "c", "concat", (), None),
        "lora: style only": ("lora", "s", "concat", (), None),
        "lora: direct sum": ("lora", "cs", "concat", (), None),
    }
    for w in (0.5, 0.7):
        variants[f"atoms: concat, style x{w}"] = ("atoms", "cs", "concat", (), ("style", w))
    for w in (1.5, 2.0):
        variants[f"atoms: concat, concept x{w}"] = ("atoms", "cs", "concat", (), ("concept", w))
    for part in ("attn1", "attn2", "to_k", "to_v", "to_q", "to_out.0", "attn1.to_q", "attn2.to_q"):
        variants[f"atoms: concat, style off in {part}"] = ("atoms", "cs", "concat", (part,), None)
        variants[f"atoms: sum, style off in {part}"] = ("atoms", "cs", "sum", (part,), None)
        variants[f"lora: direct sum, style off in {part}"] = ("lora", "cs", "concat", (part,), None)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {r["variant"] for r in rows if r["seed"] == args.seed and r["samples"] == args.samples}
    alone = {r["variant"].split(":")[0]: r["p_target"] for r in rows if r["variant"].endswith("concept only")
             and r["seed"] == args.seed and r["samples"] == args.samples}  # fmt: skip
    for name, (method, which, how, alone_in, edit) in variants.items():
        if name in done or (args.variant and name not in args.variant):
            continue
        began = time.perf_counter()
        dirs = [folders[method][0 if w == "c" else 1] for w in which]
        if edit is None:
            tuned = load_adapters(pipe.transformer, dirs, pipeline_name(pipe), how, alone_in)
        else:
            handle = AtomModel(pipe.transformer)
            handle.load_adapter(dirs[0], "concept")
            handle.load_adapter(dirs[1], "style")
            if edit == "average":
                average_shared_encoders(handle, "concept", "style")
            else:
                scale_gains(handle, *edit)
            handle.merge("concept", "style", "combined", how=how)
            tuned = handle
        try:
            row = draw_scores(pipe, classifier, references, seeds)
        finally:
            tuned.unload()
        if which == "c":
            alone[method] = row["p_target"]
        row["kept"] = row["p_target"] / alone[method] if len(which) == 2 else None
        record = {"variant": name, "seed": args.seed, "samples": args.samples, **row,
                  "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
        print(json.dumps(record), flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
