"""Tiny DINO-style ViT and CLIP models built from configs in-process, with their processors.

Random weights, 32×32 inputs, a byte-level CLIP tokenizer written on the fly: the same classes and
code paths as ``facebook/dino-vits16`` and ``openai/clip-vit-base-patch32``, no download, well under
a second to build. For the tests and for offline smoke runs (``--tiny-models``); the numbers they
give mean nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from atomtune.evaluation.metrics import Evaluator

IMAGE_SIZE = 32
_MEAN, _STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet, as dino-vits16's processor
_CLIP_MEAN, _CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]  # CLIP's


def _processor_class(name: str):
    import transformers

    # transformers 5 without torchvision: the PIL backend, named explicitly to avoid a warning
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def tiny_dino(seed: int = 0):
    """A small ``ViTModel`` (no pooler, as DINO) and a ``ViTImageProcessor`` resizing to 32×32."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    processor = _processor_class("ViTImageProcessor")(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_normalize=True,
        image_mean=_MEAN,
        image_std=_STD,
    )
    return model, processor


def tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer: every byte (and byte + ``</w>``) is a token, no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp)


def tiny_clip(seed: int = 0):
    """A small ``CLIPModel``, its ``CLIPImageProcessor`` (resize + crop to 32) and a tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = _processor_class("CLIPImageProcessor")(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_normalize=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    return model, processor, tokenizer


def tiny_evaluator(
    device: str | torch.device | None = "cpu", seed: int = 0, batch_size: int = 8, progress: bool = False
) -> Evaluator:
    dino, dino_proc = tiny_dino(seed)
    clip, clip_proc, tok = tiny_clip(seed + 1)
    return Evaluator(
        dino,
        dino_proc,
        clip,
        clip_proc,
        tok,
        device=device,
        batch_size=batch_size,
        progress=progress,
        names={"dino": "tiny-dino (random weights)", "clip": "tiny-clip (random weights)"},
    )


def save_tiny_models(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny models as local model folders ``folder/dino`` and ``folder/clip``."""
    folder = Path(folder)
    dino, dino_proc = tiny_dino(seed)
    clip, clip_proc, tok = tiny_clip(seed + 1)
    for path, parts in ((folder / "dino", (dino, dino_proc)), (folder / "clip", (clip, clip_proc, tok))):
        for part in parts:
            part.save_pretrained(path)
    return folder / "dino", folder / "clip"
