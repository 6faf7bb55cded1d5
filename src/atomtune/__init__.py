"""atomtune: sparse fine-tuning of pretrained transformers with feature-dictionary atoms.

Each adapted module's feature change is a sparse combination of learned atoms,
``ΔO = σ_λ(A·X·W_s)·D``; the sparse coefficients tell which atoms matter.
"""

__version__ = "0.1.0"

from .config import AtomConfig
from .errors import AtomtuneError
from .layer import AtomAttention, AtomLayer, AtomLinear, Atoms
from .model import AtomModel

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
