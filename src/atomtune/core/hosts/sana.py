"""Sana's linear self-attention with atoms: its own small processor (no softmax call to widen).

Sana's ``SanaLinearAttnProcessor2_0`` computes ``out_i = Σ_j v_j (φq_i·φk_j) / Σ_j φq_i·φk_j`` with
``φ = ReLU``: a row-stochastic map applied to V, built from ``V·φKᵀ`` products rather than a
softmax kernel. The coefficient channels are stacked under the value rows before the host's row of
ones (its normaliser), so they get exactly the same map: ``A·c`` from one pass, nothing
materialised. The host computes in float32; here the computation runs in at least float32 (float64
on a float64 model, so the exactness tests can hold it to 1e-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
from torch import nn

from atomtune.core.layer import AtomAttention


class SanaLinearAtomProcessor(SanaLinearAttnProcessor2_0):
    """``SanaLinearAttnProcessor2_0`` with ``ΔO`` added before the output projection."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layer: AtomAttention = attn.atoms
        atoms = layer.active
        if atoms is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        original_dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1)))  # (B, H, d, N)
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3))  # (B, H, L, d)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))  # (B, H, d, L)
        channels = layer.channels(atoms, context).transpose(2, 3)  # (B, H, m, L)
        dtype = torch.promote_types(value.dtype, torch.float32)
        wide = torch.cat([value.to(dtype), channels.to(dtype)], dim=2)
        wide = F.pad(wide, (0, 0, 0, 1), mode="constant", value=1.0)
        out = (wide @ key.to(dtype)) @ query.to(dtype)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        d = value.shape[2]
        delta = layer.update(atoms, out[:, :, d:].transpose(2, 3))
        hidden_states = out[:, :, :d].flatten(1, 2).transpose(1, 2).to(original_dtype)
        hidden_states = hidden_states + delta.to(original_dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states
