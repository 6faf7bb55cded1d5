"""atomtune: sparse fine-tuning of pretrained transformers with feature-dictionary atoms.

Each adapted module's feature change is a sparse combination of learned atoms,
``ΔO = σ_λ(A·X·W_s)·D``; the sparse coefficients tell which atoms matter.
"""

from atomtune.core.config import AtomConfig
from atomtune.core.layer import AtomAttention, AtomLayer, AtomLinear, Atoms
from atomtune.core.model import AtomModel
from atomtune.errors import AtomtuneError
from atomtune.version import __version__

__all__ = [
    "AtomAttention",
    "AtomConfig",
    "AtomLayer",
    "AtomLinear",
    "AtomModel",
    "Atoms",
    "AtomtuneError",
    "__version__",
]
