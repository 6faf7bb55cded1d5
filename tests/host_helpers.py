"""Tiny random SD3, Flux and Sana transformers (built from configs, no download) and naive float64
references for one adapted attention module: attention maps materialised, ``ΔO`` term by term."""

from __future__ import annotations

import math

import torch


def tiny_sd3(seed: int = 0):
    """SD3.5-shaped: 2 joint blocks, block 0 with the dual image-only ``attn2``, per-head RMS QK-norm;
    the last block is ``context_pre_only`` (its text output is not projected)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).double()


def sd3_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g, dtype=torch.float64),
        "pooled_projections": torch.randn(batch, 16, generator=g, dtype=torch.float64),
        "timestep": torch.tensor([3, 500][:batch]),
    }


def tiny_flux(seed: int = 0):
    """Flux-shaped: one double (joint, two-stream) block and one single (pre-only) block, RoPE."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).double()


def flux_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"))
    return {
        "hidden_states": torch.randn(batch, 16, 4, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g, dtype=torch.float64),
        "pooled_projections": torch.randn(batch, 32, generator=g, dtype=torch.float64),
        "timestep": torch.tensor([0.2, 0.9][:batch], dtype=torch.float64),
        "img_ids": img_ids.reshape(3, -1).T,
        "txt_ids": torch.zeros(6, 3),
    }


def tiny_sana(seed: int = 0):
    """Sana-shaped: linear (ReLU) self-attention and softmax cross-attention to the caption."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    ).double()


def sana_inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 5)
    mask[0, -2:] = 0  # padded caption tokens
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 5, 8, generator=g, dtype=torch.float64),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([3, 500][:batch]),
    }


def trained_looking(atom_model, seed: int = 3) -> None:
    """Non-zero ``D``, one gain and one masked atom per module: every term of ``ΔO`` is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in atom_model.atoms().values():
            a.D.copy_(torch.randn(a.D.shape, generator=g, dtype=a.D.dtype))
            a.W_s.copy_(torch.randn(a.W_s.shape, generator=g, dtype=a.W_s.dtype))
            a.lam.fill_(0.05)
            a.gain[1] = 2.0
            a.mask[2] = 0.0


def soft(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - lam.abs(), min=0)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def naive_delta_and_values(q, k, v, c, atoms, bias=None, kernel=None):
    """Per head, materialise A_h (softmax(q kᵀ/√d + bias), or ``kernel(q_h, k_h)``), then
    ``Σ_h`` columns: values ``A_h v_h`` and ``ΔO = σ_λ(concat_h A_h c_h)·diag(mask·gain)·D``."""
    heads = q.shape[1]
    m = -(-c.shape[-1] // heads)  # atom j belongs to head j // ceil(M/H)
    values, coeffs = [], []
    for h in range(heads):
        if kernel is None:
            scores = q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(q.shape[-1])
            a_h = (scores if bias is None else scores + bias).softmax(-1)
        else:
            a_h = kernel(q[:, h], k[:, h])
        values.append(a_h @ v[:, h])
        coeffs.append(a_h @ c[..., h * m : (h + 1) * m])
    s = soft(torch.cat(coeffs, -1), atoms.lam)
    delta = s @ (atoms.D * (atoms.mask * atoms.gain)[:, None])
    return torch.cat(values, -1), delta
