"""Section B's transformer VAE: 28x28 digits as 16 patches, two transformer layers each way, a 32-d latent.

Its attention layers are diffusers ``Attention`` modules, so atoms (and PEFT's LoRA) adapt them as
they adapt a DiT's, and the experiment exercises the same code paths as a real fine-tune.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atomtune.experiments.vae.settings import IMAGE, VaeSettings


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer; the attention is diffusers' ``Attention`` (so atoms can adapt it)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(query_dim=width, heads=heads, dim_head=width // heads, bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerVAE(nn.Module):
    """Section B's VAE: patches → 2 layers → (μ, log σ²) of a 32-d latent → 2 layers → patches."""

    def __init__(self, s: VaeSettings) -> None:
        super().__init__()
        self.patch = s.patch
        tokens, pixels = (IMAGE // s.patch) ** 2, s.patch * s.patch
        self.embed = nn.Linear(pixels, s.width)
        self.enc_pos = nn.Parameter(torch.randn(tokens, s.width) * 0.02)
        self.encoder = nn.ModuleList(TransformerLayer(s.width, s.heads, s.mlp_ratio) for _ in range(s.layers))
        self.enc_norm = nn.LayerNorm(s.width)
        self.to_latent = nn.Linear(s.width, 2 * s.latent)
        self.from_latent = nn.Linear(s.latent, s.width)
        self.dec_pos = nn.Parameter(torch.randn(tokens, s.width) * 0.02)
        self.decoder = nn.ModuleList(TransformerLayer(s.width, s.heads, s.mlp_ratio) for _ in range(s.layers))
        self.dec_norm = nn.LayerNorm(s.width)
        self.to_patch = nn.Linear(s.width, pixels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 28, 28) → μ, log σ² (B, latent)."""
        p = self.patch
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, 16, 49)
        h = self.embed(patches) + self.enc_pos
        for layer in self.encoder:
            h = layer(h)
        return self.to_latent(self.enc_norm(h).mean(1)).chunk(2, dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) → pixel logits (B, 1, 28, 28)."""
        h = self.from_latent(z)[:, None] + self.dec_pos
        for layer in self.decoder:
            h = layer(h)
        patches = self.to_patch(self.dec_norm(h)).transpose(1, 2)
        return F.fold(patches, (IMAGE, IMAGE), self.patch, stride=self.patch)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per pixel (Bernoulli pixels, KL to N(0, I)), averaged over the batch."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="sum")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
        return (rec + kl) / (x.shape[0] * IMAGE * IMAGE)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode(z))
