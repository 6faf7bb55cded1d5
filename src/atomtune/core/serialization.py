"""Save and load one adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

Loading checks everything before it touches the model: every field of the config (presence and
JSON type), the base model's class, each module's kind and shapes, and every tensor's presence,
shape, dtype and finiteness (no tensor the config does not name). The first problem is named in
the error, with the file and the entry. Files are written to a temporary name and renamed, so an interrupted save
never leaves a half-written adapter behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atomtune.core.config import AtomConfig
from atomtune.core.layer import AtomAttention
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write, check_fields, read_json
from atomtune.validation import check_tensor, check_type, number_problem
from atomtune.version import __version__

if TYPE_CHECKING:
    from atomtune.core.model import AtomModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
TENSORS = ("W_s", "D", "lam", "mask", "gain", "atom_ids")
_TOP_LEVEL = {"format_version", "atomtune_version", "adapter_name", "config", "base_model", "modules"}
_MODULE_FIELDS = {"kind", "in_features", "out_features", "num_atoms", "heads"}
_FLOAT_DTYPES = (torch.float32, torch.float64)  # atoms follow a float64 model, else are float32


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    cls = type(model)
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "name_or_path": name or None}


def save_adapter(handle: AtomModel, directory: str | Path, adapter: str) -> Path:
    if adapter not in handle.configs:
        raise AtomtuneError(f"no adapter named {adapter!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules, tensors = {}, {}
    layers = handle.layers()
    for name, atoms in handle.atoms(adapter).items():
        layer = layers[name]
        modules[name] = {
            "kind": layer.kind,
            "in_features": layer.in_features,
            "out_features": atoms.D.shape[1],
            "num_atoms": atoms.num_atoms,
            "heads": layer.heads,
        }
        for t in TENSORS:
            tensors[f"{name}.{t}"] = getattr(atoms, t).detach().contiguous().cpu().clone()
    config = handle.configs[adapter].to_dict()
    identity = model_identity(handle.model)
    config["base_model_name_or_path"] = config["base_model_name_or_path"] or identity["name_or_path"]
    meta = {
        "format_version": FORMAT_VERSION,
        "atomtune_version": __version__,
        "adapter_name": adapter,
        "config": config,
        "base_model": identity,
        "modules": modules,
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``: every field's presence and JSON type; the config
    inside is validated as an ``AtomConfig``."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise AtomtuneError(f"adapter folder not found: {directory}")
    if not path.is_file():
        raise AtomtuneError(f"{path} is missing: not an atomtune adapter folder")
    meta = check_fields(read_json(path), _TOP_LEVEL, _TOP_LEVEL, str(path))
    if type(meta["format_version"]) is not int or meta["format_version"] != FORMAT_VERSION:
        raise AtomtuneError(
            f"{path} has format_version {meta['format_version']!r}, this atomtune reads {FORMAT_VERSION}"
        )
    check_type(f"{path}: atomtune_version", meta["atomtune_version"], str, "a string")
    check_type(f"{path}: adapter_name", meta["adapter_name"], str, "a string")
    base = check_fields(meta["base_model"], {"class", "name_or_path"}, {"class"}, f"{path}: base_model")
    check_type(f"{path}: base_model.class", base["class"], str, "a string")
    check_type(f"{path}: base_model.name_or_path", base.get("name_or_path"), (str, type(None)), "a string")
    modules = check_type(f"{path}: modules", meta["modules"], dict, "an object {module: shapes}")
    if not modules:
        raise AtomtuneError(f"{path}: modules is empty: the adapter adapts nothing")
    for name, shape in modules.items():
        where = f"{path}: modules.{name}"
        check_fields(shape, _MODULE_FIELDS, _MODULE_FIELDS, where)
        check_type(f"{where}.kind", shape["kind"], str, "a string")
        for key in sorted(_MODULE_FIELDS - {"kind"}):
            problem = number_problem(shape[key], integer=True, minimum=1)
            if problem:
                raise AtomtuneError(f"{where}.{key} {problem}")
    config = check_type(f"{path}: config", meta["config"], dict, "an object of AtomConfig fields")
    try:
        meta["config"] = AtomConfig.from_dict(config)
    except AtomtuneError as exc:
        raise AtomtuneError(f"{path}: config: {exc}") from exc
    return meta


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` as stored (unchecked: see ``read_adapter``)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AtomtuneError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtomtuneError(f"{path} is not a readable safetensors file ({reason})") from exc


def check_adapter_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Every tensor the config names is there, with its shape, dtype and finite values; no others."""
    expected = {}
    for name, shape in meta["modules"].items():
        for t in TENSORS:
            expected[f"{name}.{t}"] = (t, _expected_shape(t, shape))
    missing = [key for key in expected if key not in tensors]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise AtomtuneError(f"{path} lacks tensor {missing[0]}{more}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AtomtuneError(f"{path} holds tensor {extra[0]} that {CONFIG_NAME} does not name")
    for key, (t, shape) in expected.items():
        where = f"{path}: {key}"
        tensor = check_tensor(
            tensors[key], where, shape, (torch.int64,) if t == "atom_ids" else _FLOAT_DTYPES
        )
        if t == "mask" and not bool(((tensor == 0) | (tensor == 1)).all()):
            raise AtomtuneError(f"{where} must hold 0 or 1 per atom")
        if t == "atom_ids":  # -1 marks the padding atoms that pruning leaves
            real = [i for i in tensor.tolist() if i != -1]
            if min(real, default=0) < 0 or len(set(real)) != len(real):
                raise AtomtuneError(f"{where} must hold distinct atom numbers >= 0 (or -1)")


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of an adapter folder, both checked."""
    meta = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    check_adapter_tensors(meta, tensors, Path(directory) / WEIGHTS_NAME)
    return meta, tensors


def load_adapter(handle: AtomModel, directory: str | Path, adapter_name: str) -> None:
    meta = read_adapter_config(directory)
    config: AtomConfig = meta["config"]
    identity = model_identity(handle.model)
    if identity["class"].rsplit(".", 1)[-1] != meta["base_model"]["class"].rsplit(".", 1)[-1]:
        raise AtomtuneError(
            f"adapter was trained on {meta['base_model']['class']}, not on {identity['class']}"
        )
    saved: dict[str, dict] = meta["modules"]
    targets = dict(handle.targets(config))
    for name in saved:
        if name not in targets:
            raise AtomtuneError(f"the model has no adaptable module {name!r} that the adapter needs")
    extra = [name for name in targets if name not in saved]
    if extra:
        raise AtomtuneError(
            f"the model has module {extra[0]!r} that the adapter's config selects but the file lacks"
        )
    for name, shape in saved.items():
        _check_module(name, shape, targets[name], config)
    tensors = read_adapter_tensors(directory)
    check_adapter_tensors(meta, tensors, Path(directory) / WEIGHTS_NAME)
    handle.add_adapter(adapter_name, config, num_atoms={n: s["num_atoms"] for n, s in saved.items()})
    with torch.no_grad():
        for name, atoms in handle.atoms(adapter_name).items():
            for t in TENSORS:
                getattr(atoms, t).copy_(tensors[f"{name}.{t}"])


def _expected_shape(tensor: str, shape: dict) -> tuple[int, ...]:
    m = shape["num_atoms"]
    return {
        "W_s": (shape["in_features"], m),
        "D": (m, shape["out_features"]),
    }.get(tensor, (m,))


def _check_module(name: str, saved: dict, module: torch.nn.Module, config: AtomConfig) -> None:
    from atomtune.core.hosts import diffusers as dx
    from atomtune.core.hosts.transformers import linear_shape

    if config.mode == "attention":
        in_features, out_features, heads = dx.attention_shape(module, config.placement, config.joint_encoder)
        kind = AtomAttention.kind
    else:
        (in_features, out_features), heads, kind = linear_shape(module), 1, "linear"
    actual = {"kind": kind, "in_features": in_features, "out_features": out_features, "heads": heads}
    for key, value in actual.items():
        if saved.get(key) != value:
            raise AtomtuneError(f"module {name}: adapter has {key}={saved.get(key)}, model has {value}")
    if saved["num_atoms"] % heads and config.mode == "attention" and dx.even_heads_only(module):
        raise AtomtuneError(f"module {name}: {saved['num_atoms']} atoms do not split over {heads} heads")
