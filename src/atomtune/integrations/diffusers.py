"""diffusers glue: find ``Attention`` modules and run them with atoms through an attention processor.

The processor follows diffusers' ``AttnProcessor2_0`` step for step and changes one thing: the
values and the atom coefficient channels go through one scaled-dot-product call
(``functional.attention_with_atoms``), so the attention map is never materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AtomtuneError
from ..functional import attention_with_atoms, merge_heads, split_heads
from ..layer import AtomAttention


def attention_class() -> type[nn.Module] | None:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # diffusers is optional for linear mode
        return None
    return Attention


def is_attention(module: nn.Module) -> bool:
    cls = attention_class()
    return cls is not None and isinstance(module, cls)


def is_cross_attention(attn: nn.Module) -> bool:
    return bool(getattr(attn, "is_cross_attention", False))


def attention_shape(attn: nn.Module, placement: str) -> tuple[int, int, int]:
    """(context width, width of ΔO, heads) of a diffusers ``Attention`` for the given placement."""
    if attn.to_out is None or not isinstance(attn.to_out[0], nn.Linear):
        raise AtomtuneError("attention mode needs an Attention module with an output projection (to_out)")
    if attn.to_v.out_features != attn.to_q.out_features:
        raise AtomtuneError("attention mode does not support grouped key/value heads yet")
    out = attn.to_out[0].in_features if placement == "pre_out" else attn.to_out[0].out_features
    return attn.to_v.in_features, out, attn.heads


def _supported_processor(processor: object) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return type(processor) in (AttnProcessor, AttnProcessor2_0, AtomAttnProcessor)


def attach(attn: nn.Module, layer: AtomAttention) -> None:
    """Register ``layer`` as ``attn.atoms`` and route the module through ``AtomAttnProcessor``."""
    if not _supported_processor(attn.processor):
        raise AtomtuneError(
            f"attention mode supports diffusers' default attention processor, "
            f"found {type(attn.processor).__name__}"
        )
    attn.add_module("atoms", layer)
    layer.original_processor = attn.processor
    attn.set_processor(AtomAttnProcessor())


def detach(attn: nn.Module) -> None:
    layer = attn.atoms
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
            out, mixed = attention_with_atoms(query, key, value, channels, attention_mask, fused=atoms.fused)
            delta = layer.update(atoms, mixed)
        hidden_states = merge_heads(out).to(query.dtype)
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
