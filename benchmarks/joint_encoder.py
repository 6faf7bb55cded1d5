"""Shared or per-stream coefficient encoder in joint attention: which fits a fine-tune better?

On a tiny random SD3 (float32, CPU), a "fine-tuned" teacher is the same model with each joint
module's image and text value projections (``to_v``, ``add_v_proj``) moved by independent random
changes, the kind of change LoRA makes at its SD3 targets. Atoms are trained to match the teacher's
output (Adam, same steps and learning rate), and the held-out error is reported relative to the
untouched model's. Three students: shared encoder, per-stream encoder, and a shared encoder with
more atoms at the per-stream one's parameter count.

    python benchmarks/joint_encoder.py --out benchmarks/results/joint-encoder.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from atomtune import AtomConfig, AtomModel
from atomtune.tiny import sd3_inputs, tiny_sd3

STUDENTS = {"shared": ("shared", 8), "per_stream": ("per_stream", 8), "shared_param_parity": ("shared", 12)}


def teacher_of(model: torch.nn.Module, seed: int, size: float = 0.3) -> torch.nn.Module:
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name.endswith(".attn") and hasattr(module, "add_v_proj"):
                for proj in (module.to_v, module.add_v_proj):
                    w = proj.weight
                    low = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
                    w.add_(size * low / w.shape[1] ** 0.5)
    return teacher


def batch(seed: int) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd3_inputs(batch=2, seed=seed).items()}


def train(
    student: torch.nn.Module, teacher: torch.nn.Module, encoder: str, atoms_per_module: int, steps: int
):
    handle = AtomModel(
        student, AtomConfig(num_atoms=atoms_per_module, joint_encoder=encoder, attention="joint")
    )
    opt = torch.optim.Adam(handle.trainable_parameters(), lr=3e-3)
    start = time.perf_counter()
    for step in range(steps):
        inputs = batch(1000 + step)
        with torch.no_grad():
            target = teacher(**inputs).sample
        loss = (student(**inputs).sample - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    return handle.num_trainable_parameters(), seconds


def held_out_error(model: torch.nn.Module, teacher: torch.nn.Module) -> float:
    errors = []
    with torch.no_grad():
        for seed in range(5):
            inputs = batch(seed)
            errors.append((model(**inputs).sample - teacher(**inputs).sample).square().mean())
    return float(torch.stack(errors).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for seed in range(args.seeds):
        base = tiny_sd3(seed=seed).float()
        teacher = teacher_of(base, seed)
        untouched = held_out_error(base, teacher)
        for label, (encoder, m) in STUDENTS.items():
            torch.manual_seed(seed)
            student = copy.deepcopy(base)
            params, seconds = train(student, teacher, encoder, m, args.steps)
            rel = held_out_error(student, teacher) / untouched
            runs.append(
                {
                    "seed": seed,
                    "student": label,
                    "encoder": encoder,
                    "num_atoms": m,
                    "trainable_parameters": params,
                    "relative_error": rel,
                    "seconds_per_step": seconds,
                }
            )
            print(json.dumps(runs[-1]))
    summary = {}
    for label in STUDENTS:
        rows = [r for r in runs if r["student"] == label]
        summary[label] = {
            "num_atoms": rows[0]["num_atoms"],
            "trainable_parameters": rows[0]["trainable_parameters"],
            "relative_error_mean": sum(r["relative_error"] for r in rows) / len(rows),
            "seconds_per_step_mean": sum(r["seconds_per_step"] for r in rows) / len(rows),
        }
    result = {
        "model": "tiny SD3.5-shaped (2 blocks, 2 heads x 8, dual attn2 in block 0), float32, CPU",
        "steps": args.steps,
        "seeds": args.seeds,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
