"""Atoms as a PEFT method: ``get_peft_model(model, AtomsPeftConfig(...))``, ``transformer.add_adapter``,
``save_pretrained`` / ``PeftModel.from_pretrained``, named adapters, ``disable_adapter()``, ``unload()``.

- ``config``: ``AtomsPeftConfig`` (``AtomConfig``'s linear-mode fields, ``target_modules`` as PEFT
  takes them);
- ``layer``: ``AtomsLayer`` / ``Linear``, the core formula inside PEFT's layer; ``model``:
  ``AtomsModel``, the tuner;
- ``handle``: ``atoms_of`` (``AtomModel``'s operations on PEFT's atoms: importance, masks, gains, top-k,
  prune), ``save_adapter`` / ``load_adapter`` (PEFT's folder and atomtune's);
- ``registration``: ``PeftType.ATOMS`` and PEFT's registry entries.

Importing this package registers the method, so ``import atomtune.peft`` comes before PEFT reads a
saved atoms adapter. Glue on the host floor: it imports ``atomtune.core`` and PEFT; the core never
imports it.
"""

from atomtune.peft import registration
from atomtune.peft.config import AtomsPeftConfig
from atomtune.peft.handle import PeftAtoms, atoms_of, base_model, load_adapter, save_adapter
from atomtune.peft.layer import AtomsLayer, Linear
from atomtune.peft.model import AtomsModel

registration.register(AtomsPeftConfig, AtomsModel)

__all__ = [
    "AtomsLayer",
    "AtomsModel",
    "AtomsPeftConfig",
    "Linear",
    "PeftAtoms",
    "atoms_of",
    "base_model",
    "load_adapter",
    "save_adapter",
]
