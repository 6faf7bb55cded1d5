"""One place that puts a fine-tuning method on a diffusion transformer: atoms, LoRA, DoRA or OFT.

All four adapt the same modules, the attention projections ``to_q, to_k, to_v, to_out.0`` (atoms: the
attention modules that hold them), in place, base frozen, so the trainer and the pipeline do not care
which one runs. The baselines come from PEFT with the paper's settings: LoRA and DoRA rank 16
(``lora_alpha`` = rank), OFT ``r=4`` blocks.

An adapter folder holds the method's own files (atomtune's ``adapter_config.json`` +
``adapter_model.safetensors``, or PEFT's files of the same names) and ``atomtune.json``: the method,
the base model's name and class, and the shapes of the adapted projections. Loading checks those
shapes against the model first, so an adapter for another model fails with a clear message.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..budget import AtomBudgetRun
from ..config import AtomConfig
from ..errors import AtomtuneError
from ..model import AtomModel
from ..serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    check_fields,
    model_identity,
    read_adapter_config,
    read_json,
)
from ..validation import check_tensor, check_type, number_problem
from .images import save_json
from .pipeline import PixArtSpec

METHODS = ("atoms", "lora", "dora", "oft")
# Atoms on PixArt-Σ: 64 per attention module is LoRA r=16's parameter count there (2·1152·64 + 64 =
# 147,520 against 4·16·2·1152 = 147,456), cut to 6 (9%) during training, as measured on the testbed.
DEFAULT_NUM_ATOMS = 64
DEFAULT_ATOM_BUDGET = 6
SIDECAR = "atomtune.json"
TARGET_MODULES = PixArtSpec.target_modules


@dataclass
class MethodConfig:
    """Which method, and its few settings (the rest are the paper's or the core's defaults)."""

    method: str = "atoms"
    num_atoms: int = DEFAULT_NUM_ATOMS
    rank: int = 16
    oft_r: int = 4
    atoms: dict[str, Any] = field(default_factory=dict)  # further AtomConfig fields
    atom_budget: int = DEFAULT_ATOM_BUDGET  # atoms kept per module after training; 0 keeps all

    def __post_init__(self) -> None:
        check_method(self.method)
        for name in ("num_atoms", "rank", "oft_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AtomtuneError(f"{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.atom_budget, int)
            or isinstance(self.atom_budget, bool)
            or self.atom_budget < 0
        ):
            raise AtomtuneError(
                f"atom_budget must be an integer >= 0 (0: keep all), got {self.atom_budget!r}"
            )
        reserved = {"num_atoms", "atom_budget", "mode", "base_model_name_or_path"}
        reserved = sorted(set(self.atoms) & reserved)
        if reserved:
            raise AtomtuneError(f"set {reserved[0]} through its own option, not in the atoms settings")
        if self.method == "atoms":
            self.atom_config()  # validate early

    def atom_config(self, base: str | None = None) -> AtomConfig:
        budget = self.atom_budget if 0 < self.atom_budget < self.num_atoms else None
        return AtomConfig.from_dict(
            {
                "num_atoms": self.num_atoms,
                "atom_budget": budget,
                **self.atoms,
                "mode": "attention",
                "base_model_name_or_path": base,
            }
        )

    def peft_config(self, base: str | None = None):
        from peft import LoraConfig, OFTConfig

        targets = list(TARGET_MODULES)
        if self.method == "oft":
            return OFTConfig(
                r=self.oft_r, oft_block_size=0, target_modules=targets, base_model_name_or_path=base
            )
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,
            use_dora=self.method == "dora",
            target_modules=targets,
            base_model_name_or_path=base,
        )

    def describe(self) -> str:
        if self.method == "atoms":
            c = self.atom_config()
            kept = f", cut to {c.atom_budget} by contribution" if c.atom_budget else ""
            return (
                f"atoms: {c.num_atoms} per attention module{kept} ({c.attention}-attention, {c.placement}), "
                f"shrinkage {c.shrinkage}, L1 weight {c.sparsity_weight}, orthogonality weight "
                f"{c.orthogonality_weight}"
            )
        if self.method == "oft":
            return f"OFT (PEFT), r={self.oft_r} blocks on {', '.join(TARGET_MODULES)}"
        name = "DoRA" if self.method == "dora" else "LoRA"
        return f"{name} (PEFT), rank {self.rank}, alpha {self.rank} on {', '.join(TARGET_MODULES)}"


def check_method(method: str) -> None:
    if method not in METHODS:
        raise AtomtuneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def projection_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``[in, out]`` of every adapted projection: the fingerprint an adapter must match."""
    shapes = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in TARGET_MODULES):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear):
            shapes[name] = [base.in_features, base.out_features]
    return shapes


def base_record(model: nn.Module, pretrained: str | None) -> dict[str, Any]:
    identity = model_identity(model)
    return {"pretrained": pretrained, "class": identity["class"], "projections": projection_shapes(model)}


# -- the tuned transformer ----------------------------------------------------------------------
class Tuned:
    """A transformer with one method's adapter(s) injected in place; the trainer's only view of it."""

    method: str

    def __init__(self, model: nn.Module, pretrained: str | None) -> None:
        self.model = model
        self.pretrained = pretrained

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def regularization(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The method's extra loss for the last forward and its terms (atoms only); call once per forward."""
        return None, {}

    # -- hooks of the training loop (atoms: the budget's cuts; the baselines have none) ------------
    def start_training(self, total_steps: int, seed: int) -> None:
        """Called once before the first step."""

    def after_step(self, step: int) -> float | None:
        """Called after each optimizer step; a number asks the loop to set lr = base lr x number."""
        return None

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the trainable parameters that a checkpoint must keep for an exact resume."""
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``training_state`` returned; refuse tensors this run does not have."""
        if tensors:
            raise AtomtuneError(f"holds tensors this adapter does not have ({sorted(tensors)[0]})")

    def finish_training(self) -> None:
        """Called once after the last step, before the adapter is saved."""

    def live_atoms(self) -> dict[str, int]:
        """Atoms per module that can act (atoms only; pads and cut atoms do not count)."""
        return {}

    @contextmanager
    def disable(self) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """Remove the adapter(s): the model is the pretrained one again."""
        raise NotImplementedError

    def _write_sidecar(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        record = {
            "atomtune_version": __version__,
            "method": self.method,
            "base_model": base_record(self.model, self.pretrained),
            **(extra or {}),
        }
        save_json(record, directory / SIDECAR)


class AtomTuned(Tuned):
    method = "atoms"

    def __init__(self, handle: AtomModel, pretrained: str | None) -> None:
        super().__init__(handle.model, pretrained)
        self.handle = handle
        self._budget: AtomBudgetRun | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.handle.trainable_parameters()

    def regularization(self) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.handle.regularization_terms()
        loss = self.handle.weigh(terms)
        return loss, {**{k: float(v.detach()) for k, v in terms.items()}, **self.handle.activity()}

    def live_atoms(self) -> dict[str, int]:
        return {name: int((a.mask != 0).sum()) for name, a in self.handle.atoms().items()}

    def start_training(self, total_steps: int, seed: int) -> None:
        self._budget = AtomBudgetRun.start(self.handle, total_steps, seed)

    def after_step(self, step: int) -> float | None:
        return None if self._budget is None else self._budget.after_step(step)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {} if self._budget is None else self._budget.state()

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._budget is None:
            super().load_training_state(tensors)
        else:
            self._budget.load_state(tensors)

    def finish_training(self) -> None:
        if self._budget is not None:
            self._budget.finish()
            self._budget = None

    @contextmanager
    def disable(self) -> Iterator[None]:
        with self.handle.disable():
            yield

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        self.handle.save(directory)
        self._write_sidecar(directory, extra)
        return directory

    def unload(self) -> nn.Module:
        return self.handle.unload()


class PeftTuned(Tuned):
    def __init__(
        self,
        model: nn.Module,
        method: str,
        adapters: list[str],
        pretrained: str | None,
        requires_grad: dict[str, bool] | None = None,
    ) -> None:
        super().__init__(model, pretrained)
        self.method = method
        self.adapters = adapters
        self._requires_grad = requires_grad or {}

    def _tuner_layers(self) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def activate(self) -> None:
        """Make every loaded adapter act (several at once: their updates add up)."""
        names = self.adapters if len(self.adapters) > 1 else self.adapters[0]
        for layer in self._tuner_layers():
            layer.set_adapter(names)  # also makes exactly these adapters' parameters trainable

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.model.named_parameters() if p.requires_grad]

    @contextmanager
    def disable(self) -> Iterator[None]:
        layers = self._tuner_layers()
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        if len(self.adapters) != 1:
            raise AtomtuneError("only a single PEFT adapter can be saved")
        adapter = self.adapters[0]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.model, adapter_name=adapter, save_embedding_layers=False)
        state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
        config = _peft_config_dict(self.model.peft_config[adapter])
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        self._write_sidecar(directory, extra)
        return directory

    def unload(self) -> nn.Module:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        return self.model


_PEFT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _is_peft_parameter(name: str) -> bool:
    return any(key in name for key in ("lora_", "oft_"))


def _peft_config_dict(config) -> dict[str, Any]:
    data = config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
        elif hasattr(value, "value") and isinstance(value.value, str):
            data[key] = value.value
    return data


def _set_peft_state(model: nn.Module, directory: str | Path, adapter: str) -> None:
    from peft import set_peft_model_state_dict

    from ..serialization import read_adapter_tensors

    state = read_adapter_tensors(directory)
    for key, tensor in state.items():  # PEFT writes float tensors; NaN would draw NaN images
        check_tensor(tensor, f"{Path(directory) / WEIGHTS_NAME}: {key}", None, _PEFT_DTYPES)
    expected = {
        n for n, _ in model.named_parameters() if f".{adapter}." in f".{n}." and _is_peft_parameter(n)
    }
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    except RuntimeError as exc:  # size mismatches
        raise AtomtuneError(f"{directory}: the adapter's tensors do not fit this model ({exc})") from exc
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [k for k in (getattr(result, "missing_keys", None) or []) if k in expected]
    if unexpected or missing:
        key = (unexpected or missing)[0]
        raise AtomtuneError(f"{directory}: the adapter's tensors do not fit this model ({key})")


# -- apply and load -----------------------------------------------------------------------------
def _float32_trainables(tuned: Tuned) -> None:
    """Adapters train in float32 on a half-precision base (as PEFT and the core do)."""
    for p in tuned.trainable_parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def apply_method(
    model: nn.Module, config: MethodConfig, pretrained: str | None, name: str = "default"
) -> Tuned:
    """Inject a fresh adapter of ``config.method`` into ``model`` (in place, base frozen)."""
    if config.method == "atoms":
        tuned: Tuned = AtomTuned(AtomModel(model, config.atom_config(pretrained), name), pretrained)
    else:
        from peft import inject_adapter_in_model

        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            inject_adapter_in_model(config.peft_config(pretrained), model, adapter_name=name)
        except ValueError as exc:
            raise AtomtuneError(f"{config.method} does not fit this model: {exc}") from exc
        tuned = PeftTuned(model, config.method, [name], pretrained, requires_grad)
        tuned.activate()
    _float32_trainables(tuned)
    return tuned


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
    model: nn.Module, directories: list[str | Path], pretrained: str | None, combine: str = "concat"
) -> Tuned:
    """Load one or more adapters of one method into ``model``, all acting together.

    Several atom adapters are merged into one (``combine="concat"``: the exact sum of their updates;
    ``"sum"``: the paper's parameter sum); several PEFT adapters are activated together.
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
                    handle.merge(current, name, merged, how=combine)
                    current = merged
        except Exception:
            handle.unload()
            raise
        return AtomTuned(handle, pretrained)
    from peft import PeftConfig, inject_adapter_in_model

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    tuned = PeftTuned(model, method, names, pretrained, requires_grad)
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
    except Exception:
        tuned.unload()
        raise
    tuned.activate()
    return tuned


__all__ = [
    "METHODS",
    "AtomTuned",
    "MethodConfig",
    "PeftTuned",
    "Tuned",
    "apply_method",
    "check_base",
    "load_adapters",
    "read_adapter_info",
]
