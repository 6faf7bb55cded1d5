"""transformers glue: GPT-2 style ``Conv1D`` layers are linear layers with a transposed weight."""

from __future__ import annotations

from torch import nn


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D``, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None
