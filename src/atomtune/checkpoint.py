"""Resumable training state in safetensors + JSON: tensors, optimizer, RNG, step.

Long work must survive interruption, and tensors are only ever loaded from safetensors (no
pickle). An optimizer's ``state_dict`` is flattened into named tensors plus a JSON skeleton, and
the torch RNG states travel as uint8 tensors, so a resumed run draws the same noise as an
uninterrupted one. The folder is written to a temporary name and renamed into place.

Loading checks the whole state before it changes anything: the step, the optimizer's kind and
every tensor it names, the RNG states' presence, dtype and size, and that no tensor holds NaN.
``prune_checkpoints`` keeps the newest few ``checkpoint-<step>`` folders, so a long run with
frequent checkpoints does not fill the disk.
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

from atomtune.errors import AtomtuneError
from atomtune.validation import check_tensor, number_problem

STATE_JSON = "trainer_state.json"
TENSORS = "state.safetensors"
PREFIX = "checkpoint-"
_META = {"step", "extra", "optimizer", "optimizer_class"}


def _optimizer_class(optimizer: torch.optim.Optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the optimizer
    return type(inner).__name__


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: Any, where: str) -> dict[str, Any]:
    """The optimizer's ``state_dict`` back from the skeleton; every entry and tensor checked."""
    if not isinstance(skeleton, dict) or not isinstance(skeleton.get("state"), dict):
        raise AtomtuneError(f"{where}: optimizer must be an object with state and param_groups")
    groups = skeleton.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise AtomtuneError(f"{where}: optimizer.param_groups must be a list of groups with params")
    state = {}
    for pid, entry in skeleton["state"].items():
        if not pid.isdigit() or not isinstance(entry, dict):
            raise AtomtuneError(f"{where}: optimizer.state.{pid} is not a parameter's state")
        state[int(pid)] = {}
        for key, ref in entry.items():
            if not isinstance(ref, dict) or not ({"tensor"} == set(ref) or {"value"} == set(ref)):
                raise AtomtuneError(
                    f"{where}: optimizer.state.{pid}.{key} must be {{tensor: name}} or {{value: v}}"
                )
            if "value" in ref:
                state[int(pid)][key] = ref["value"]
                continue
            name = ref["tensor"]
            if name not in tensors:
                raise AtomtuneError(f"{where}: the optimizer's tensor {name} is missing from {TENSORS}")
            tensor = tensors[name]
            state[int(pid)][key] = check_tensor(tensor, f"{where}: {name}", None, (tensor.dtype,))
    return {"state": state, "param_groups": groups}


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
        meta["optimizer_class"] = _optimizer_class(optimizer)
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
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise AtomtuneError(f"checkpoint in {folder} is corrupt ({exc})") from exc
    where = f"checkpoint {folder}"
    if not isinstance(meta, dict) or not {"step", "extra"} <= set(meta) or set(meta) - _META:
        raise AtomtuneError(f"{where}: {STATE_JSON} must hold an object with step and extra (only)")
    problem = number_problem(meta["step"], integer=True, minimum=0)
    if problem:
        raise AtomtuneError(f"{where}: step {problem}")
    if not isinstance(meta["extra"], dict):
        raise AtomtuneError(f"{where}: extra must be an object, got {type(meta['extra']).__name__}")
    for name, tensor in tensors.items():
        if name.startswith("model."):
            check_tensor(tensor, f"{where}: {name}", None, (tensor.dtype,))
    rng = _rng_states(tensors, where) if restore_rng else None
    if optimizer is not None:
        if "optimizer" not in meta:
            raise AtomtuneError(f"checkpoint in {folder} holds no optimizer state")
        saved_class, here = meta.get("optimizer_class"), _optimizer_class(optimizer)
        if saved_class is not None and saved_class != here:
            raise AtomtuneError(f"{where} holds the state of a {saved_class} optimizer; this run uses {here}")
        state = _unflatten_optimizer(tensors, meta["optimizer"], where)
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AtomtuneError(f"{where}: the optimizer state does not fit this run ({reason})") from exc
    if rng is not None:
        torch.set_rng_state(rng[0])
        if rng[1] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng[1])
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, meta["step"], meta["extra"]


def _rng_states(tensors: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU and CUDA RNG states, checked against this torch's (a wrong size would crash torch)."""
    if "rng.cpu" not in tensors:
        raise AtomtuneError(f"{where}: the RNG state rng.cpu is missing from {TENSORS}")
    cpu = check_tensor(tensors["rng.cpu"], f"{where}: rng.cpu", torch.get_rng_state().shape, (torch.uint8,))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        shape = torch.cuda.get_rng_state().shape
        for i, state in enumerate(cuda):
            check_tensor(state, f"{where}: rng.cuda.{i}", shape, (torch.uint8,))
    return cpu, cuda


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for p in directory.glob(PREFIX + "*"):
        suffix = p.name[len(PREFIX) :]
        if suffix.isdigit() and (p / STATE_JSON).is_file() and (p / TENSORS).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step in ``directory``, if any."""
    found = _checkpoints(Path(directory))
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep: int, newest: str | Path | None = None) -> list[Path]:
    """Delete all but ``keep`` complete ``checkpoint-<step>`` folders (0: keep every one).

    Call it after a new checkpoint is complete: ``newest`` is always kept, with the ``keep - 1``
    others of highest step; leftovers of an interrupted save or deletion go too. A folder is renamed
    before it is deleted, so an interruption never leaves a half-deleted checkpoint that looks whole.
    """
    directory = Path(directory)
    for stale in directory.glob("." + PREFIX + "*"):  # temporary folders of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    if keep < 1:
        return []
    others = [p for _, p in _checkpoints(directory) if newest is None or p != Path(newest)]
    removed = others[: max(len(others) - (keep - 1 if newest is not None else keep), 0)]
    for path in removed:
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed
