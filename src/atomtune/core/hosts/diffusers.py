"""diffusers glue: find attention modules and run them with atoms through an attention processor.

Hosts with diffusers' default processor (PixArt) use ``AtomAttnProcessor`` below. SD3, Flux,
QwenImage, Wan (text-to-video), Lumina2, HiDream and Sana's cross-attention keep their own
processor, widened (``widened``, table in ``layouts``); Sana's linear self-attention has its own
small processor (``sana``).

The processor follows diffusers' ``AttnProcessor2_0`` step for step and changes one thing: the
values and the atom coefficient channels go through one scaled-dot-product call
(``functional.attention_with_atoms``), so the attention map is never materialised. Where the
projections are plain ``nn.Linear`` layers and q, k are not normalised, on a GPU, the widened heads
come out of the projections themselves (``functional.head_padded_linear``): no per-call pad or concat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from atomtune.core.functional import (
    attention_padded,
    attention_with_atoms,
    head_padded_linear,
    head_width,
    merge_heads,
    split_heads,
)
from atomtune.core.hosts.layouts import LAYOUTS, context_width, has_text_stream, layout_of
from atomtune.core.hosts.widened import atom_processor
from atomtune.core.layer import AtomAttention, Atoms
from atomtune.errors import AtomtuneError


def attention_class() -> type[nn.Module] | None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers is optional for linear mode
        return None
    return Attention


def is_attention(module: nn.Module) -> bool:
    """diffusers' ``Attention``, or a module built on its ``AttentionModuleMixin`` (``FluxAttention``)."""
    cls = attention_class()
    if cls is None:
        return False
    from diffusers.models.attention import AttentionModuleMixin

    return isinstance(module, (cls, AttentionModuleMixin))


def is_cross_attention(attn: nn.Module) -> bool:
    return bool(getattr(attn, "is_cross_attention", False))


def attention_kind(attn: nn.Module) -> str:
    """``"joint"`` (text and image tokens attend together: SD3, Flux, QwenImage, HiDream), ``"cross"`` or
    ``"self"`` (Wan image-to-video's cross-attention to text and image context counts as cross)."""
    layout = layout_of(attn.processor)
    joins = layout is not None and not layout.separate_added_kv
    if joins and (has_text_stream(attn) or layout.single_stream_joint):
        return "joint"
    return "cross" if is_cross_attention(attn) else "self"


def attention_shape(attn: nn.Module, placement: str, joint_encoder: str = "shared") -> tuple[int, int, int]:
    """(context width, width of ΔO, heads) of a diffusers attention module for the given placement."""
    layout = layout_of(attn.processor)
    if layout is None:
        return _default_attention_shape(attn, placement)
    name = type(attn.atoms.original_processor if hasattr(attn, "atoms") else attn.processor).__name__
    if placement != "pre_out":
        raise AtomtuneError(f"placement {placement!r} is not supported with {name} yet; use pre_out")
    if layout.separate_added_kv and has_text_stream(attn):
        raise AtomtuneError(
            f"{name} attends this module's added image context (add_k_proj, add_v_proj: Wan "
            f"image-to-video) in a second attention call, and atoms ride in one; Wan text-to-video only"
        )
    if attn.to_v.out_features != attn.to_q.out_features and not layout.repeats_kv:
        raise AtomtuneError(f"attention mode does not support grouped key/value heads with {name} yet")
    width = context_width(attn, joint_encoder == "per_stream")
    if width < 0:
        raise AtomtuneError(
            f"text and image tokens of this {type(attn).__name__} differ in width; use joint_encoder='per_stream'"
        )
    return width, attn.to_q.out_features, attn.heads


def _default_attention_shape(attn: nn.Module, placement: str) -> tuple[int, int, int]:
    if attn.to_out is None or not isinstance(attn.to_out[0], nn.Linear):
        raise AtomtuneError("attention mode needs an Attention module with an output projection (to_out)")
    if attn.to_v.out_features != attn.to_q.out_features:
        raise AtomtuneError("attention mode does not support grouped key/value heads yet")
    out = attn.to_out[0].in_features if placement == "pre_out" else attn.to_out[0].out_features
    return attn.to_v.in_features, out, attn.heads


def even_heads_only(attn: nn.Module) -> bool:
    """PixArt's processor (and its projection-built heads) needs atoms split evenly over the heads;
    the host processors pad an uneven split."""
    return layout_of(attn.processor) is None


def _supported_processor(processor: object) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0, AtomAttnProcessor)


def _atom_processor_for(processor: object) -> object:
    """The processor that runs ``processor``'s host with atoms, or a one-line error naming it."""
    if _supported_processor(processor):
        return AtomAttnProcessor()
    layout = layout_of(processor)
    if layout is None or type(processor).__name__ not in LAYOUTS:
        raise AtomtuneError(
            f"attention mode supports diffusers' default, SD3 (JointAttnProcessor2_0), Flux "
            f"(FluxAttnProcessor), Sana, QwenImage, Wan, Lumina2 and HiDream attention processors, "
            f"found {type(processor).__name__}"
        )
    if layout.linear:
        from atomtune.core.hosts.sana import SanaLinearAtomProcessor  # diffusers is optional

        return SanaLinearAtomProcessor()
    return atom_processor(processor)


def attach(attn: nn.Module, layer: AtomAttention, name: str = "") -> None:
    """Register ``layer`` as ``attn.atoms``, route the module through an atom processor, and guard it:
    a processor swapped in later (``set_attn_processor``, ``fuse_qkv_projections``) would drop the
    atoms silently, so the module's next call raises instead."""
    processor = _atom_processor_for(attn.processor)
    if has_text_stream(attn) and layer.in_features != attn.to_v.in_features:
        layer.fan_in = attn.to_v.in_features  # per-stream encoder: each token sees its own block
    layer.even_heads = even_heads_only(attn)
    attn.add_module("atoms", layer)
    layer.original_processor = attn.processor
    layer.module_name = name or type(attn).__name__
    attn.set_processor(processor)
    layer.processor = attn.processor
    layer.guard = attn.register_forward_pre_hook(_check_processor)


def _check_processor(attn: nn.Module, args: tuple) -> None:
    layer = attn.atoms
    if attn.processor is not layer.processor:
        raise AtomtuneError(
            f"{layer.module_name}: its attention processor was replaced by {type(attn.processor).__name__} "
            f"after atoms were injected (set_attn_processor, fuse_qkv_projections, IP-adapter or PAG "
            f"do this), which would drop the atoms; inject atoms after such a change"
        )


def detach(attn: nn.Module) -> None:
    layer = attn.atoms
    layer.guard.remove()
    attn.set_processor(layer.original_processor)
    del attn.atoms


class AtomAttnProcessor:
    """``AttnProcessor2_0`` with the atom update ``ΔO`` added before or after the output projection."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        layer: AtomAttention = attn.atoms
        atoms = layer.active
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        if atoms is not None and pads_through_weights(attn, atoms, context):
            out, mixed = _padded_attention(attn, layer, atoms, hidden_states, context, attention_mask)
            delta = layer.update(atoms, mixed)
        else:
            query = split_heads(attn.to_q(hidden_states), attn.heads)
            key = split_heads(attn.to_k(context), attn.heads)
            value = split_heads(attn.to_v(context), attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if atoms is None:
                out = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask
                )
                delta = None
            else:
                channels = layer.channels(atoms, context)
                out, mixed = attention_with_atoms(
                    query, key, value, channels, attention_mask, fused=atoms.fused
                )
                delta = layer.update(atoms, mixed)
        hidden_states = merge_heads(out).to(hidden_states.dtype)
        placement = None if atoms is None else atoms.placement
        if placement == "pre_out":
            hidden_states = hidden_states + delta.to(hidden_states.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if placement == "post_out":
            hidden_states = hidden_states + delta.to(hidden_states.dtype)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# Devices where the widened heads come out of the projections. On a CPU the per-call pad and concat
# are cheap copies and the extra weight rows cost arithmetic: interleaved on cpu-small, one thread,
# the training step took 5-8% longer that way; on a GPU the copies are launches and memory traffic.
PADDED_PROJECTION_DEVICES: tuple[str, ...] = ("cuda",)


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def pads_through_weights(attn: nn.Module, atoms: Atoms, context: torch.Tensor) -> bool:
    """Whether the widened heads come out of the projections: a device that gains from it, plain
    linear q, k, v (no PEFT layer, no hook), no q/k normalisation (it would see the padding), the
    one-call path, and ``W_s`` in the context's precision or castable down to it (as
    ``AtomAttention.channels``)."""
    if context.device.type not in PADDED_PROJECTION_DEVICES:
        return False
    if not atoms.fused or attn.norm_q is not None or attn.norm_k is not None:
        return False
    if not all(_plain_linear(m) for m in (attn.to_q, attn.to_k, attn.to_v)):
        return False
    half = context.dtype in (torch.float16, torch.bfloat16)
    return half or context.dtype == atoms.W_s.dtype


def _padded_attention(
    attn: nn.Module,
    layer: AtomAttention,
    atoms: Atoms,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and mixed coefficient channels with the widened heads built by the projections.

    Training adds ``Xc·W_s`` into the value heads' zero slots (one small in-place add): stacking
    ``W_s`` onto ``to_v``'s weight would make autograd compute the full stacked weight's gradient.
    Without a gradient on ``W_s`` the channels come out of the value projection itself.
    """
    heads = attn.heads
    d = attn.to_q.out_features // heads
    m = atoms.num_atoms // heads
    width = head_width(d, m)
    query = head_padded_linear(hidden_states, attn.to_q.weight, attn.to_q.bias, heads, width)
    key = head_padded_linear(context, attn.to_k.weight, attn.to_k.bias, heads, width)
    to_v = attn.to_v
    if torch.is_grad_enabled() and atoms.W_s.requires_grad:
        value = head_padded_linear(context, to_v.weight, to_v.bias, heads, width)
        value[..., d : d + m] += layer.channels(atoms, context).to(value.dtype)
    else:
        w_s = atoms.W_s.to(context.dtype)
        value = head_padded_linear(context, to_v.weight, to_v.bias, heads, width, extra=w_s)
    return attention_padded(query, key, value, d, m, attention_mask)


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> Callable[[], None]:
    """Regional compilation: each of ``model.transformer_blocks`` through ``torch.compile``.

    The blocks share one code path, so one compiled graph serves all of them: compile time is that of
    one block, not of the whole model (PyTorch's regional-compilation recipe; diffusers'
    ``compile_repeated_blocks`` does the same for models that declare their repeated blocks, which
    PixArt does not). The atom processors run inside the compiled blocks, so shrinkage and decoding
    are compiled with the attention around them. Returns a function that puts the eager blocks back.
    """
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise AtomtuneError(
            f"--compile needs a transformer with transformer_blocks; {type(model).__name__} has none"
        )
    eager = list(blocks)
    for i, block in enumerate(eager):
        blocks[i] = torch.compile(block, **compile_kwargs)

    def restore() -> None:
        for i, block in enumerate(eager):
            blocks[i] = block

    return restore
