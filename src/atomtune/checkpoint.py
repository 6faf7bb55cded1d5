"""Resumable training state in safetensors + JSON: tensors, optimizer, RNG, step.

Long work must survive interruption, and tensors are only ever loaded from safetensors (no
pickle). An optimizer's ``state_dict`` is flattened into named tensors plus a JSON skeleton, and
the torch RNG states travel as uint8 tensors, so a resumed run draws the same noise as an
uninterrupted one. The folder is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AtomtuneError

STATE_JSON = "trainer_state.json"
TENSORS = "state.safetensors"


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, skeleton = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, state in sd["state"].items():
        entry = {}
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"optimizer.{pid}.{key}"}
            else:
                entry[key] = {"value": value}
        skeleton["state"][str(pid)] = entry
    return tensors, skeleton


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    return {"state": state, "param_groups": skeleton["param_groups"]}


def save_training_state(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder`` atomically: model tensors, optimizer state, RNG states, step and ``extra``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    all_tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta: dict[str, Any] = {"step": step, "extra": extra or {}}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        all_tensors.update(opt_tensors)
    all_tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            all_tensors[f"rng.cuda.{i}"] = s
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_file(all_tensors, str(tmp / TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_training_state(
    folder: str | Path, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True
) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    """Read a folder written by ``save_training_state``; load the optimizer and RNG states in place.

    Returns the model tensors (without their ``model.`` prefix), the step and ``extra``.
    """
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file() or not (folder / TENSORS).is_file():
        raise AtomtuneError(f"no checkpoint in {folder} (expected {STATE_JSON} and {TENSORS})")
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise AtomtuneError(f"checkpoint in {folder} is corrupt ({exc})") from exc
    if optimizer is not None:
        if "optimizer" not in meta:
            raise AtomtuneError(f"checkpoint in {folder} holds no optimizer state")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        torch.set_rng_state(tensors["rng.cpu"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, meta["step"], meta["extra"]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step in ``directory``, if any."""
    found = []
    for p in Path(directory).glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / STATE_JSON).is_file():
            found.append((int(suffix), p))
    return max(found)[1] if found else None
