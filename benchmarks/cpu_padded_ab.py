"""Interleaved A/B on the CPU: atoms' widened heads built by the projections against the per-call
pad/concat path, on the speed harness's cpu-small model, in one process, alternating every round.

    python benchmarks/cpu_padded_ab.py --atoms 64 --rounds 11 --threads 1

Alternating the two paths within one process keeps a busy machine's drift out of the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from atomtune.core.hosts import diffusers as dx
from atomtune.speed.adapt import apply_method
from atomtune.speed.measure import training_step
from atomtune.speed.models import build_transformer, make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_transformer("cpu-small", "cpu", torch.float32)
    inputs = make_inputs("cpu-small", 1, "cpu", torch.float32)
    tuned = apply_method(model, "atoms", args.atoms)
    step = training_step(model, tuned, inputs)

    @torch.no_grad()
    def infer() -> None:
        model(**inputs)

    paths = {"pad/concat per call": (), "heads from the projections": ("cpu",)}
    times: dict[tuple[str, str], list[float]] = {(p, k): [] for p in paths for k in ("train", "infer")}
    for r in range(args.rounds + 1):  # round 0 warms up
        for path, devices in paths.items():
            dx.PADDED_PROJECTION_DEVICES = devices
            for kind, fn in (("train", step), ("infer", infer)):
                start = time.perf_counter()
                fn()
                if r:
                    times[(path, kind)].append((time.perf_counter() - start) * 1e3)
    print(f"cpu-small, {args.atoms} atoms, {args.threads} thread(s), {args.rounds} interleaved rounds")
    for (path, kind), ts in times.items():
        print(f"{kind:5s} {path:27s} median {statistics.median(ts):8.1f} ms  min {min(ts):8.1f} ms")


if __name__ == "__main__":
    main()
