"""What every experiment records about its own run besides its results: the final loss, the machine.

The toy and the VAE write the same two things into their JSON, so a reader can compare runs of either
(and a rerun on another machine) on the same terms; one definition here keeps the two records alike.
"""

from __future__ import annotations

import math
import platform
from typing import Any

import torch


def final_loss(losses: list[float]) -> float:
    """Mean of the last twentieth of the per-step losses (at least one step): the loss a run ended at.

    A mean rather than the last step's loss, because one minibatch's loss is noise; NaN for no steps.
    """
    tail = losses[-max(1, len(losses) // 20) :]
    return sum(tail) / len(tail) if tail else math.nan


def environment() -> dict[str, Any]:
    """torch version, thread count, Python version and machine: what a run's numbers depend on."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
