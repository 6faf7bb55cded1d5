"""28x28 digit images for the VAE experiment: scikit-learn's bundled digits, or MNIST from IDX files.

scikit-learn's digits (1797 images, 8x8, 16 grey levels) ship with scikit-learn, so the experiment
runs offline; they are scaled up to 20x20 (bilinear) and centred in a 28x28 frame, the way MNIST
centres its digits in a 20x20 box. MNIST is read from the IDX files a user downloaded
(``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``, plain or ``.gz``); nothing is fetched.

The IDX format (LeCun's): two zero bytes, a type code, the number of dimensions ``n``, then ``n``
big-endian uint32 sizes and the values, big-endian, row-major.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atomtune.errors import AtomtuneError

# IDX type code → numpy dtype (big-endian)
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip) into an array; ``AtomtuneError`` if missing, corrupt or short."""
    path = Path(path)
    if not path.is_file():
        raise AtomtuneError(f"IDX file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:  # a .gz that is not gzip, or cut short
        raise AtomtuneError(f"{path} is not a readable gzip file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise AtomtuneError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise AtomtuneError(f"{path} is not an IDX file (truncated header)")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise AtomtuneError(f"{path} is {what}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise AtomtuneError(f"no {names[0]} (or .gz) in {directory}")


def load_mnist_idx(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training set from ``directory``: images (N, 1, 28, 28) in [0, 1], labels (N,)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise AtomtuneError(f"MNIST folder not found: {directory}")
    images_path = _find(directory, MNIST_FILES["images"])
    labels_path = _find(directory, MNIST_FILES["labels"])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise AtomtuneError(
            f"{images_path} holds {images.dtype} of shape {images.shape}, not 28x28 uint8 images"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise AtomtuneError(f"{labels_path} holds {labels.shape} labels for {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise AtomtuneError(f"{labels_path} has labels outside 0-9")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


def load_sklearn_digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (1797, 1, 28, 28) in [0, 1]: 8x8 → 20x20 bilinear, centred with 4 px margins."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.from_numpy((data.images / 16.0).astype(np.float32))[:, None]
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    return F.pad(big, (4, 4, 4, 4)), torch.from_numpy(data.target.astype(np.int64))


def load_digit_images(source: str, directory: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``"digits"`` (bundled) or ``"mnist-idx"`` (``directory``): images (N, 1, 28, 28), labels (N,)."""
    if source == "digits":
        return load_sklearn_digits_28()
    if source == "mnist-idx":
        if directory is None:
            raise AtomtuneError("--data mnist-idx needs the folder with the MNIST IDX files")
        return load_mnist_idx(directory)
    raise AtomtuneError(f"data must be 'digits' or 'mnist-idx', got {source!r}")


def split_per_class(
    labels: torch.Tensor, seed: int, holdout_share: float = 0.2, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out indices, the same share of every class; ``cap`` limits images per class."""
    g = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        if cap is not None:
            idx = idx[:cap]
        cut = int(len(idx) * holdout_share)
        held.append(idx[:cut])
        train.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values
