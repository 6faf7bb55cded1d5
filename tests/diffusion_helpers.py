"""Helpers of the diffusion tests: DreamBooth images (downscaled) and single-threaded torch.

The DreamBooth data lives in ``shared/`` beside the repository (``<repo>/../shared``); tests that need
it skip when it is absent. Tiny models run faster on one thread than on several (thread start-up
costs more than their matrix products), so the diffusion tests run single-threaded and restore the
thread count afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

DREAMBOOTH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth" / "dataset"


def dreambooth_images(folder: Path, subject: str, count: int, size: int = 48) -> Path:
    """Copy ``count`` photos of a DreamBooth subject into ``folder``, downscaled to ``size`` px."""
    if not (DREAMBOOTH / subject).is_dir():
        pytest.skip(f"DreamBooth data not found at {DREAMBOOTH}")
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((DREAMBOOTH / subject).glob("*.jpg"))[:count]:
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size)).save(folder / f"{path.stem}.png")
    return folder


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
