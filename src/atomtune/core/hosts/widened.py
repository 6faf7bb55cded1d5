"""Atoms inside a host's own attention processor: its one attention call, widened.

A host processor (SD3's ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``, Sana's cross
``SanaAttnProcessor2_0``, QwenImage's ``QwenDoubleStreamAttnProcessor2_0``, Wan's
``WanAttnProcessor``, Lumina2's ``Lumina2AttnProcessor2_0``, HiDream's ``HiDreamAttnProcessor``) is
kept as it is; ``atom_processor`` gives a subclass with the host's exact call signature (diffusers
drops every keyword a processor does not name, so a ``*args`` wrapper would silently lose RoPE or
masks). The subclass computes the coefficient channels ``c = Xc·W_s`` from its own arguments
(``layouts`` says which, in which order), then runs the host's ``__call__`` under a
``TorchFunctionMode`` that catches its single ``F.scaled_dot_product_attention`` call and runs it
over ``[v | c]`` instead (``functional.attention_with_atoms``: q, k zero-padded, the host's scale
kept; Lumina2 repeats its grouped k/v heads before the call, so the channels go per query head).
``ΔO`` is added to the kernel's output, which is exactly "before the output projection" whatever
the host does next (split streams, ``to_add_out``, Flux single blocks' ``proj_out`` over
``[attention | MLP]``, HiDream's bare ``to_out`` and ``to_out_t``). No host code is copied, so new
diffusers releases keep their own processor logic; a change in stream order shows up as a
key-length mismatch or in the host tests' float64 references.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from atomtune.core.functional import attention_with_atoms
from atomtune.core.hosts.layouts import HIDDEN, encoder_rows, layout_of, value_streams
from atomtune.core.layer import AtomAttention, Atoms
from atomtune.errors import AtomtuneError

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_CLASSES: dict[type, type] = {}


def atom_processor(host: object) -> object:
    """An instance of ``Atom<HostClass>``, carrying ``host``'s state (attention backend settings)."""
    cls = type(host)
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = _CLASSES[cls] = _subclass(cls)
    processor = sub.__new__(sub)
    processor.__dict__.update(vars(host))
    return processor


def _subclass(cls: type) -> type:
    signature = inspect.signature(cls.__call__)

    def __call__(self: Any, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(self, attn, *args, **kwargs).arguments
        host_call = functools.partial(cls.__call__, self, attn, *args, **kwargs)
        return call_with_atoms(attn, arguments, host_call)

    __call__.__signature__ = signature  # what diffusers reads to decide which kwargs to pass
    doc = f"``{cls.__name__}`` with its attention call widened by the atom channels (see ``widened``)."
    return type("Atom" + cls.__name__, (cls,), {"__call__": __call__, "__doc__": doc, "host_class": cls})


def call_with_atoms(attn: nn.Module, arguments: dict[str, Any], host_call: functools.partial) -> Any:
    """Run the host processor; with an active adapter, inside the widening mode."""
    layer: AtomAttention = attn.atoms
    atoms = layer.active
    if atoms is None:
        return host_call()
    channels = joint_channels(attn, layer, atoms, arguments)
    mode = WidenedAttention(layer, atoms, channels)
    with mode:
        out = host_call()
    if mode.calls != 1:
        backend = getattr(attn.processor, "_attention_backend", None)
        raise AtomtuneError(
            f"{type(attn.processor).__name__} made no scaled_dot_product_attention call for the atoms to "
            f"ride in (attention backend {backend!r}); atoms need diffusers' native attention backend"
        )
    return out


def joint_channels(
    attn: nn.Module, layer: AtomAttention, atoms: Atoms, arguments: dict[str, Any]
) -> torch.Tensor:
    """``Xc·W_s`` per head for every key token, in the kernel's key order: (B, H, L, M/H)."""
    streams = value_streams(attn, layout_of(attn.processor))
    rows = encoder_rows(attn, per_stream=atoms.W_s.shape[0] != attn.to_v.in_features)
    parts = []
    for argument, _ in streams:
        tokens = arguments.get(argument)
        if tokens is None and len(streams) == 1:
            tokens = arguments[HIDDEN]  # a one-stream module without a context attends its own tokens
        if tokens is not None:
            parts.append(layer.channels(atoms, tokens, rows[argument]))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class WidenedAttention(TorchFunctionMode):
    """Catches the host's one ``scaled_dot_product_attention`` and runs it over ``[v | c]``; returns
    ``A·v + ΔO`` in the kernel's layout. Every other op passes through untouched."""

    def __init__(self, layer: AtomAttention, atoms: Atoms, channels: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.atoms, self.channels = layer, atoms, channels
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            raise AtomtuneError(
                "the host processor made more than one attention call; atoms need exactly one"
            )
        call = dict(zip(_SDPA_ARGS, args, strict=False)) | kwargs
        if call.get("dropout_p") or call.get("is_causal") or call.get("enable_gqa"):
            raise AtomtuneError("atoms do not support attention dropout, causal masks or grouped kv heads")
        query, key, value = call["query"], call["key"], call["value"]
        c = self.channels
        if c.shape[:3] != key.shape[:3]:
            raise AtomtuneError(
                f"atom channels {tuple(c.shape[:3])} do not match the host's keys {tuple(key.shape[:3])}: "
                f"this diffusers version joins its streams differently"
            )
        scale = call.get("scale")
        out_v, mixed = attention_with_atoms(
            query,
            key,
            value,
            c,
            call.get("attn_mask"),
            fused=self.atoms.fused,
            scale=1.0 / math.sqrt(query.shape[-1]) if scale is None else scale,
        )
        delta = self.layer.update(self.atoms, mixed)
        b, h, n, d = out_v.shape
        return out_v + delta.view(b, n, h, d).transpose(1, 2).to(out_v.dtype)
