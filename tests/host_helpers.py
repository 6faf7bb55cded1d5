"""The tiny SD3, Flux and Sana transformers (``atomtune.tiny``), tiny QwenImage, Wan, Lumina2 and
HiDream ones (here: only the tests use them), naive float64 references for one adapted attention
module (attention maps materialised, ``ΔO`` term by term), and the checks every host shares."""

from __future__ import annotations

import math

import torch

from atomtune import AtomConfig, AtomModel
from atomtune.tiny import flux_inputs, sana_inputs, sd3_inputs, tiny_flux, tiny_sana, tiny_sd3  # noqa: F401


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


def run(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def assert_exact_and_acting(got, want, bare) -> None:
    """A module's outputs (one tensor or a tuple per stream) equal the reference to 1e-10 and differ
    from the module without atoms (the atoms do act)."""
    got, want, bare = ((x,) if torch.is_tensor(x) else x for x in (got, want, bare))
    for g, w, b in zip(got, want, bare, strict=True):
        assert torch.allclose(g, w, atol=1e-10), (g - w).abs().max()
        assert (g - b).abs().max() > 1e-3


def check_identity_and_gradients(model, inputs: dict, config: AtomConfig) -> AtomModel:
    """Fresh atoms leave the model's output as it was (``D = 0``), and disabled ones give the host's
    own call; one backward reaches every module's ``D``."""
    bare = run(model, inputs)
    atoms = AtomModel(model, config)
    assert torch.allclose(run(model, inputs), bare, atol=1e-12)
    with atoms.disable():
        assert torch.allclose(run(model, inputs), bare, rtol=0, atol=1e-14)
    model(**inputs).sample.square().mean().backward()
    assert all(a.D.grad.abs().sum() > 0 for a in atoms.atoms().values())
    return atoms


def check_round_trip_masks_and_prune(build, inputs: dict, config: AtomConfig, keep, pruned: int, path):
    """Save → load into a fresh ``build()`` is exact; all atoms masked gives the pretrained output;
    masking ``keep`` and pruning keeps the output, with ``pruned`` atoms left per module. Returns
    the adapted model (for a processor-swap check)."""
    model = build()
    bare = run(model, inputs)
    atoms = AtomModel(model, config)
    trained_looking(atoms)
    want = run(model, inputs)
    atoms.save(path / "adapter")
    loaded = AtomModel.load(build(), path / "adapter")
    assert torch.allclose(run(loaded.model, inputs), want, rtol=0, atol=1e-14)
    atoms.set_masks({name: torch.zeros(len(keep)) for name in atoms.layers()})
    assert torch.allclose(run(model, inputs), bare, atol=1e-12)
    atoms.set_masks({name: torch.tensor(keep) for name in atoms.layers()})
    masked = run(model, inputs)
    assert set(atoms.prune().values()) == {pruned}
    assert torch.allclose(run(model, inputs), masked, atol=1e-12)
    return model


def soft(z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.clamp(z.abs() - lam.abs(), min=0)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def naive_delta_and_values(q, k, v, c, atoms, bias=None, kernel=None, scale=None):
    """Per head, materialise A_h (softmax(q kᵀ·scale + bias), scale 1/√d unless given, or
    ``kernel(q_h, k_h)``), then ``Σ_h`` columns: values ``A_h v_h`` and
    ``ΔO = σ_λ(concat_h A_h c_h)·diag(mask·gain)·D``."""
    heads = q.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    m = -(-c.shape[-1] // heads)  # atom j belongs to head j // ceil(M/H)
    values, coeffs = [], []
    for h in range(heads):
        if kernel is None:
            scores = q[:, h] @ k[:, h].transpose(-1, -2) * scale
            a_h = (scores if bias is None else scores + bias).softmax(-1)
        else:
            a_h = kernel(q[:, h], k[:, h])
        values.append(a_h @ v[:, h])
        coeffs.append(a_h @ c[..., h * m : (h + 1) * m])
    s = soft(torch.cat(coeffs, -1), atoms.lam)
    delta = s @ (atoms.D * (atoms.mask * atoms.gain)[:, None])
    return torch.cat(values, -1), delta


def tiny_qwenimage(seed: int = 0):
    """QwenImage-shaped: 2 double-stream blocks (keys ``[text, image]``), per-head RMS QK-norm, MSRoPE."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).double()


def qwenimage_inputs(batch: int = 2, seed: int = 1) -> dict:
    """Packed 4x4 latents and an 8-token caption, padded in the first item (a bool joint mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 8)
    mask[0, -3:] = 0
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 8, 16, generator=g, dtype=torch.float64),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.2, 0.9][:batch], dtype=torch.float64),
        "img_shapes": [(1, 4, 4)] * batch,
    }


def tiny_wan(seed: int = 0, **i2v):
    """Wan-shaped (text-to-video): 2 blocks of self-attention (RMSNorm across heads, 3-D RoPE) and
    cross-attention to the text. ``image_dim=…, added_kv_proj_dim=…`` make it image-to-video."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **i2v,
    ).double()


def wan_inputs(batch: int = 2, seed: int = 1) -> dict:
    """Two frames of 8x8 latents (32 video tokens) and 6 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g, dtype=torch.float64),
        "timestep": torch.tensor([3, 500][:batch]),
    }


def tiny_lumina2(seed: int = 0):
    """Lumina2-shaped: 3 query heads over 1 grouped kv head, per-head RMS QK-norm, 3-axis RoPE; one
    caption refiner, one image refiner, 2 ``layers`` over the joint ``[caption, image]`` sequence."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=2,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(128, 128, 128),
        cap_feat_dim=32,
    ).double()


def lumina2_inputs(batch: int = 2, seed: int = 1) -> dict:
    """8x8 latents (16 image tokens) and a 6-token caption, padded in the first item."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[0, -2:] = False
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g, dtype=torch.float64),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([0.2, 0.9][:batch], dtype=torch.float64),
    }


def tiny_hidream(seed: int = 0):
    """HiDream-shaped: one double block (image ``to_q/k/v``, text ``to_q_t/k_t/v_t``, keys
    ``[image, text]``), one single block on the joint sequence; RMSNorm across heads, 2-axis RoPE."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[8, 4],
        text_emb_dim=8,
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(16, 16),
        llama_layers=(0, 1),
        force_inference_output=True,
    ).double()


def hidream_inputs(batch: int = 2, seed: int = 1, height: int = 8) -> dict:
    """8 x ``height`` latents (a non-square one is padded to 64 tokens and masked by the host),
    5 T5 tokens and 5 tokens from each of 2 Llama layers."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, height, 8, generator=g, dtype=torch.float64),
        "timesteps": torch.tensor([3, 500][:batch]),
        "encoder_hidden_states_t5": torch.randn(batch, 5, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states_llama3": torch.randn(2, batch, 5, 4, generator=g, dtype=torch.float64),
        "pooled_embeds": torch.randn(batch, 8, generator=g, dtype=torch.float64),
    }
