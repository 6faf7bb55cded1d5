"""One run of the toy: data, both blocks, measures, and the files ``fourier.json`` and ``fourier.png``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from atomtune.experiments.fourier.block import FourierBlock
from atomtune.experiments.fourier.measures import evaluate, linear_reference, subspace_references
from atomtune.experiments.fourier.report import example_signal, figure_png
from atomtune.experiments.fourier.settings import FourierSettings
from atomtune.experiments.fourier.signals import make_signals
from atomtune.experiments.fourier.training import train_blocks
from atomtune.experiments.run_record import environment, final_loss
from atomtune.io import atomic_write


def run_fourier(
    settings: FourierSettings, out_dir: Path, progress: bool = True, processes: int = 1
) -> dict[str, Any]:
    """Generate the data, train both blocks, measure, write ``fourier.json`` and ``fourier.png``.

    ``processes`` = 2 trains the two blocks side by side (see ``train_blocks``).

    Returns the dict written to ``fourier.json``: ``settings``, ``bases`` (shared frequencies or None),
    ``linear_nmse``, ``dense`` and ``sparse`` (see ``evaluate``; plus ``train_seconds`` and the final
    ``train_loss``), ``ratio_atoms_needed`` (dense / sparse), ``example`` (the plotted signal),
    ``seconds`` (the whole run) and ``environment``.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    s = settings
    s.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(s.seed)
    lift = torch.randn(s.lift_dim, generator=g)
    bases = torch.randperm(s.max_freq + 1, generator=g)[: s.n_bases].sort().values if s.shared_bases else None
    train = make_signals(s, s.train_signals, g, bases)
    test = make_signals(s, s.eval_signals, g, bases)

    result: dict[str, Any] = {
        "settings": asdict(s),
        "bases": None if bases is None else bases.tolist(),
        "linear_nmse": linear_reference(train, test),
        "references": None if bases is None else subspace_references(test, bases),
    }
    blocks: dict[str, FourierBlock] = {}
    trained = train_blocks(s, lift, train, progress, processes)
    for kind, (block, losses, train_seconds, train_cpu_seconds) in trained.items():
        block.eval()
        blocks[kind] = block
        result[kind] = evaluate(block, test, s, bases) | {
            "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu_seconds,
            "train_loss": final_loss(losses),
        }
    result["ratio_atoms_needed"] = (
        result["dense"]["atoms_needed_mean"] / result["sparse"]["atoms_needed_mean"]
    )
    result["example"] = example_signal(blocks, test, s)
    result["environment"] = environment() | {"processes": processes}
    png = figure_png(result["example"], result)
    result["seconds"] = time.perf_counter() - start
    # This process's threads plus the workers' training; wall time varies with load.
    result["cpu_seconds"] = time.process_time() - cpu_start
    if processes > 1:
        result["cpu_seconds"] += sum(result[kind]["train_cpu_seconds"] for kind in trained)
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out_dir / "fourier.png", lambda p: p.write_bytes(png))
    atomic_write(out_dir / "fourier.json", lambda p: p.write_text(text))
    return result
