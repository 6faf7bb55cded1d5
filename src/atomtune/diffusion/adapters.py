"""Adapter folders: which method and base model they are for, checked against a model, and loaded.

Loading checks the recorded projection shapes against the model first, so an adapter for another
model fails with a clear message instead of a shape error deep inside PyTorch or PEFT.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from atomtune.core.model import AtomModel
from atomtune.core.serialization import CONFIG_NAME, read_adapter_config
from atomtune.diffusion.methods import METHODS
from atomtune.diffusion.peft_tuned import PeftTuned, _set_peft_state
from atomtune.diffusion.tuned import SIDECAR, AtomTuned, Tuned, projection_shapes
from atomtune.errors import AtomtuneError
from atomtune.io import check_fields, read_json
from atomtune.validation import check_type, number_problem


def read_adapter_info(directory: str | Path) -> dict[str, Any]:
    """Method and base model of an adapter folder (atomtune's sidecar, or what its files say).

    Every field of the sidecar is checked for its JSON type, so a hand-edited or truncated
    ``atomtune.json`` ends in one line naming the file and the entry.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AtomtuneError(f"adapter folder not found: {directory}")
    sidecar = directory / SIDECAR
    if sidecar.is_file():
        return _check_sidecar(read_json(sidecar), sidecar)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AtomtuneError(f"{directory} holds no adapter ({CONFIG_NAME} is missing)")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise AtomtuneError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    if "format_version" in config:  # saved by AtomModel.save directly
        meta = read_adapter_config(directory)
        return {"method": "atoms", "base_model": {"pretrained": None, "class": meta["base_model"]["class"]}}
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        return {"method": "dora" if config.get("use_dora") else "lora", "base_model": {}}
    if peft_type == "OFT":
        return {"method": "oft", "base_model": {}}
    raise AtomtuneError(f"{config_path} is neither an atomtune nor a LoRA/DoRA/OFT adapter")


def _check_sidecar(info: Any, path: Path) -> dict[str, Any]:
    check_fields(info, {"atomtune_version", "method", "base_model", "merged_from"}, {"method"}, str(path))
    if info["method"] not in METHODS:
        raise AtomtuneError(f"{path}: method must be one of {', '.join(METHODS)}, got {info['method']!r}")
    check_type(f"{path}: atomtune_version", info.get("atomtune_version", ""), str, "a string")
    check_type(f"{path}: merged_from", info.get("merged_from", {}), dict, "an object")
    base = check_fields(
        info.get("base_model", {}), {"pretrained", "class", "projections"}, set(), f"{path}: base_model"
    )
    for key in ("pretrained", "class"):
        check_type(f"{path}: base_model.{key}", base.get(key), (str, type(None)), "a string")
    projections = base.get("projections")
    if projections is not None:
        check_type(f"{path}: base_model.projections", projections, dict, "an object {module: [in, out]}")
        for name, shape in projections.items():
            ok = isinstance(shape, list) and len(shape) == 2
            if not ok or any(number_problem(n, integer=True, minimum=1) for n in shape):
                raise AtomtuneError(f"{path}: base_model.projections.{name} must be [in, out], got {shape!r}")
    return info


def check_base(model: nn.Module, info: dict[str, Any], directory: str | Path, pretrained: str | None) -> None:
    """Refuse an adapter made for another model; note (stderr) a different name with equal shapes."""
    base = info.get("base_model") or {}
    trained_on = base.get("pretrained") or "an unrecorded model"
    saved_class = (base.get("class") or "").rsplit(".", 1)[-1]
    here_class = type(model).__name__
    if saved_class and saved_class != here_class:
        raise AtomtuneError(
            f"adapter {directory} is for another model: it was trained on {trained_on} "
            f"({saved_class}), this model is a {here_class}"
        )
    saved = base.get("projections")
    if saved is not None:
        here = projection_shapes(model)
        for name in sorted(set(saved) | set(here)):
            if saved.get(name) != here.get(name):
                theirs = "absent" if name not in saved else "x".join(map(str, saved[name]))
                ours = "absent" if name not in here else "x".join(map(str, here[name]))
                raise AtomtuneError(
                    f"adapter {directory} is for another model: it was trained on {trained_on}, where "
                    f"{name} is {theirs} (in x out); in this model it is {ours}"
                )
    if base.get("pretrained") and pretrained and base["pretrained"] != pretrained:
        print(
            f"atomtune: note: adapter {directory} was trained on {base['pretrained']}; loading it onto "
            f"{pretrained} (same shapes)",
            file=sys.stderr,
        )


def load_adapters(
    model: nn.Module,
    directories: list[str | Path],
    pretrained: str | None,
    combine: str = "concat",
    first_only: Sequence[str] = (),
) -> Tuned:
    """Load one or more adapters of one method into ``model``, all acting together.

    Several atom adapters are merged into one (``combine="concat"``: the exact sum of their updates;
    ``"sum"``: the paper's parameter sum); several PEFT adapters are activated together. In the
    ``first_only`` modules the first adapter acts alone, whatever the method.
    """
    if not directories:
        raise AtomtuneError("no adapter given")
    infos = [read_adapter_info(d) for d in directories]
    methods = {info["method"] for info in infos}
    if len(methods) > 1:
        raise AtomtuneError(
            f"adapters of different methods cannot act together: {', '.join(sorted(methods))}"
        )
    for info, directory in zip(infos, directories, strict=True):
        check_base(model, info, directory, pretrained)
    method = methods.pop()
    names = [f"adapter_{i}" for i in range(len(directories))] if len(directories) > 1 else ["default"]
    if method == "atoms":
        handle = AtomModel(model)
        try:
            for name, directory in zip(names, directories, strict=True):
                handle.load_adapter(directory, name)
            if len(names) > 1:
                current = names[0]
                for i, name in enumerate(names[1:], start=1):
                    merged = "combined" if i == len(names) - 1 else f"combined_{i}"
                    handle.merge(current, name, merged, how=combine, first_only=first_only)
                    current = merged
        except Exception:
            handle.unload()
            raise
        return AtomTuned(handle, pretrained)
    from peft import PeftConfig, inject_adapter_in_model

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    tuned = PeftTuned(model, method, names, pretrained, requires_grad, first_only)
    try:
        for name, directory in zip(names, directories, strict=True):
            try:
                config = PeftConfig.from_pretrained(str(directory))
            except (OSError, ValueError, TypeError) as exc:
                raise AtomtuneError(f"{directory}: unreadable PEFT config ({exc})") from exc
            config.inference_mode = False
            try:
                with warnings.catch_warnings():  # "multiple adapters in the model": intended here
                    warnings.simplefilter("ignore", UserWarning)
                    inject_adapter_in_model(config, model, adapter_name=name)
            except ValueError as exc:
                raise AtomtuneError(f"adapter {directory} does not fit this model: {exc}") from exc
            _set_peft_state(model, directory, name)
        tuned.activate()
    except Exception:
        tuned.unload()
        raise
    return tuned
