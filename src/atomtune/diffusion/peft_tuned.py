"""LoRA, DoRA and OFT from PEFT behind the ``Tuned`` interface, and their adapter state on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atomtune.core.serialization import CONFIG_NAME, WEIGHTS_NAME
from atomtune.core.targets import check_parts, has_part
from atomtune.diffusion.tuned import Tuned
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write
from atomtune.validation import check_tensor


class PeftTuned(Tuned):
    def __init__(
        self,
        model: nn.Module,
        method: str,
        adapters: list[str],
        pretrained: str | None,
        requires_grad: dict[str, bool] | None = None,
        first_only: Sequence[str] = (),
    ) -> None:
        """``first_only``: modules (each named by a dotted part of its name, ``attn1.to_q``) where
        the first adapter acts alone when several are loaded."""
        super().__init__(model, pretrained)
        self.method = method
        self.adapters = adapters
        self.first_only = list(first_only)
        self._requires_grad = requires_grad or {}

    def _tuner_layers(self) -> list[tuple[str, nn.Module]]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]

    def activate(self) -> None:
        """Make every loaded adapter act (several at once: their updates add up)."""
        names = self.adapters if len(self.adapters) > 1 else self.adapters[0]
        layers = self._tuner_layers()
        check_parts((name for name, _ in layers), self.first_only)
        for name, layer in layers:
            alone = self.first_only and has_part(name, self.first_only)
            layer.set_adapter(self.adapters[0] if alone else names)  # these adapters also train

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.model.named_parameters() if p.requires_grad]

    @contextmanager
    def disable(self) -> Iterator[None]:
        layers = [layer for _, layer in self._tuner_layers()]
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

    from atomtune.core.serialization import read_adapter_tensors

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
