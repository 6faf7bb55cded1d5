"""Instance images and prompts: read a folder of images into tensors, check prompts and tokens.

Every problem a user can cause (a missing or empty folder, files that are not images, a prompt
without the unique token) ends in an ``AtomtuneError`` that names the file or the prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from atomtune.errors import AtomtuneError
from atomtune.io import list_images, open_image


def square_crop(img, resolution: int):
    """Resize the shorter side to ``resolution`` and crop the centre square."""
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor(img) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float tensor in [-1, 1]."""
    import numpy as np

    array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


def load_images(source: str | Path, resolution: int, what: str = "instance images") -> torch.Tensor:
    """All images of a folder (or one file), square-cropped to ``resolution``: (N, 3, R, R) in [-1, 1]."""
    paths = list_images(source, what)
    return torch.stack([to_tensor(square_crop(open_image(p), resolution)) for p in paths])


def has_token(prompt: str, token: str) -> bool:
    """Whether ``token`` occurs in ``prompt`` as a word of its own ("a sks dog", not "asks")."""
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", prompt) is not None


def check_prompts(instance_prompt: str, token: str | None, class_prompt: str | None = None) -> None:
    """The instance prompt must name the unique token; the class prompt must not."""
    if not instance_prompt or not instance_prompt.strip():
        raise AtomtuneError("the instance prompt is empty (e.g. --instance-prompt 'a sks dog')")
    if token is None:
        return
    if not token.strip() or re.search(r"\s", token):
        raise AtomtuneError(f"the unique token must be one word, got {token!r}")
    if not has_token(instance_prompt, token):
        raise AtomtuneError(
            f"the instance prompt {instance_prompt!r} does not contain the unique token {token!r} "
            f"(e.g. 'a {token} dog'; use --token to name another token)"
        )
    if class_prompt is not None and has_token(class_prompt, token):
        raise AtomtuneError(
            f"the class prompt {class_prompt!r} contains the unique token {token!r}; it must describe "
            f"the class only (e.g. 'a dog') for prior preservation to work"
        )


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a clear error for a missing file or one that is not text."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AtomtuneError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AtomtuneError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc
    if "\x00" in text:
        raise AtomtuneError(f"{what} {path} is not text (it holds NUL bytes)")
    return text


def read_prompts(prompts: list[str] | None = None, prompts_file: str | Path | None = None) -> list[str]:
    """Prompts from flags and/or a file (one per line; blank lines and ``#`` comments skipped)."""
    result = [p for p in (prompts or []) if p.strip()]
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        for line in read_text_file(path, "prompts file").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                result.append(line)
    return result


CAPTIONS = "metadata.jsonl"  # the Hugging Face imagefolder layout: {"file_name": ..., "text": ...} per line


def read_captions(folder: str | Path, images: list[Path]) -> list[str] | None:
    """Each image's own caption from ``folder/metadata.jsonl``, in the order of ``images``; ``None``
    when the folder has no such file (then one prompt serves every image)."""
    import json

    path = Path(folder).expanduser() / CAPTIONS
    if not path.is_file():
        return None
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AtomtuneError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
        if not (
            isinstance(record, dict)
            and isinstance(record.get("file_name"), str)
            and isinstance(record.get("text"), str)
        ):
            raise AtomtuneError(f'{path}, line {number}: expected {{"file_name": "...", "text": "..."}}')
        captions[record["file_name"]] = record["text"]
    missing = [p.name for p in images if p.name not in captions]
    if missing:
        raise AtomtuneError(f"{path} has no caption for {missing[0]}")
    return [captions[p.name] for p in images]
