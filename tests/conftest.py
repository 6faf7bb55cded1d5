from __future__ import annotations

import pytest
import torch

from atomtune.tiny import tiny_pixart, tiny_pixart_inputs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def pixart():
    return tiny_pixart(seed=0)


@pytest.fixture
def pixart_inputs():
    return tiny_pixart_inputs(batch=2, seed=1)


def run_pixart(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def randomize_atoms(atom_model, scale: float = 0.5, seed: int = 0) -> None:
    """Give every atom a non-zero D (a trained-looking adapter) so updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for atoms in atom_model.atoms().values():
            atoms.D.copy_(torch.randn(atoms.D.shape, generator=g) * scale)
