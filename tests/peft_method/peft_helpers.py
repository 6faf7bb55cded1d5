"""Twins for the PEFT tests: one tiny model adapted by ``AtomModel``, one by PEFT, same weights."""

from __future__ import annotations

import torch

from atomtune import AtomConfig, AtomModel
from atomtune.diffusion.sd3 import SD3Spec
from atomtune.peft import AtomsPeftConfig, atoms_of
from atomtune.tiny import tiny_pixart, tiny_pixart_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the projections the DreamBooth LoRA scripts adapt
SD3_TARGETS = list(SD3Spec.target_modules)  # train_dreambooth_lora_sd3.py's, as the host spec names them
METHOD = {"num_atoms": 6, "lambda_init": 0.1}


def pixart() -> torch.nn.Module:
    return tiny_pixart(seed=0).double()


def pixart_inputs() -> dict:
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in tiny_pixart_inputs(batch=2, seed=1).items()
    }


def atom_config(targets=TARGETS, **method) -> AtomConfig:
    return AtomConfig(mode="linear", target_modules=list(targets), **{**METHOD, **method})


def peft_config(targets=TARGETS, **method) -> AtomsPeftConfig:
    return AtomsPeftConfig(target_modules=list(targets), **{**METHOD, **method})


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def move_every_tensor(handle, seed: int, steer: bool = True) -> None:
    """New values for every trainable tensor (``W_s``, ``D``, ``λ``) and, with ``steer``, a mask and a
    gain per module: a trained, steered adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for atoms in handle.atoms().values():
            for tensor in (atoms.W_s, atoms.D, atoms.lam):
                tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=torch.float64) * 0.3)
            if steer:
                atoms.mask[1] = 0.0
                atoms.gain[2] = 1.7


def copy_atoms(source, target, adapter: str | None = None) -> None:
    """Every tensor of ``source``'s atoms into ``target``'s (both ``AtomModel``-like handles)."""
    into = target.atoms(adapter)
    assert sorted(into) == sorted(source.atoms(adapter))
    with torch.no_grad():
        for name, atoms in source.atoms(adapter).items():
            for key, value in atoms.state_dict().items():
                into[name].state_dict()[key].copy_(value)


def same_atoms(a, b, adapter: str | None = None, b_adapter: str | None = None) -> bool:
    """The two handles hold bitwise the same tensors, module by module (``adapter`` of ``a``,
    ``b_adapter`` of ``b``; default: the active ones)."""
    left, right = a.atoms(adapter), b.atoms(b_adapter)
    if sorted(left) != sorted(right):
        return False
    return all(
        torch.equal(value, right[name].state_dict()[key])
        for name, atoms in left.items()
        for key, value in atoms.state_dict().items()
    )


def twins(targets=TARGETS, **method) -> tuple[AtomModel, torch.nn.Module]:
    """``AtomModel`` on one tiny PixArt, ``get_peft_model`` on another, the PEFT atoms set to the
    ``AtomModel``'s initial values."""
    from peft import get_peft_model

    reference = AtomModel(pixart(), atom_config(targets, **method))
    peft_model = get_peft_model(pixart(), peft_config(targets, **method))
    copy_atoms(reference, atoms_of(peft_model))
    return reference, peft_model
