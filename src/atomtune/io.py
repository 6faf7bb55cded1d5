"""Files, written whole or not at all, and read with errors that say which file is wrong.

Every module that writes a result goes through ``atomic_write`` (a temporary file, then a rename), so
an interrupted run never leaves a half-written JSON or image; every reader raises ``AtomtuneError``
with the file's path. The image helpers refuse what PIL would choke on, in one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atomtune.errors import AtomtuneError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: the most pixels an image may have (PIL's own guard against decompression bombs, 89 million)
MAX_PIXELS = 89_478_485


def list_images(source: str | Path, what: str = "instance images", allow_empty: bool = False) -> list[Path]:
    """The image files of a folder (sorted), or a single image file; an error if there are none
    (unless ``allow_empty``: then the caller says what an empty folder means)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise AtomtuneError(f"{path} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise AtomtuneError(f"{what}: folder not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images and not allow_empty:
        found = "it is empty" if not files else f"it holds {len(files)} file(s), none an image"
        raise AtomtuneError(f"{what}: no images in {path} ({found}; looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def open_image(path: Path):
    """The image at ``path`` as RGB; a clear error when it is not a readable image or is larger than
    ``MAX_PIXELS`` (a small file can claim billions of pixels and exhaust the memory)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise AtomtuneError(
                        f"{path} is {img.width}x{img.height} pixels, more than the {MAX_PIXELS:,} "
                        "an image may have; resize it first"
                    )
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise AtomtuneError(f"{path} has more pixels than an image may have ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise AtomtuneError(f"{path} is not a readable image ({exc.__class__.__name__})") from exc


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file, or raise ``AtomtuneError`` saying which file is missing or broken."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AtomtuneError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AtomtuneError(f"{path} is not valid JSON: {exc}") from exc


def check_fields(obj: Any, known: set[str], required: set[str], where: str) -> dict:
    """``obj`` must be a JSON object with no field outside ``known`` and every field of ``required``."""
    if not isinstance(obj, dict):
        raise AtomtuneError(f"{where} must hold a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - known)
    if unknown:
        raise AtomtuneError(f"{where} has unknown field(s): {', '.join(unknown)}")
    missing = sorted(required - set(obj))
    if missing:
        raise AtomtuneError(f"{where} lacks field(s): {', '.join(missing)}")
    return obj


def save_png(image, path: str | Path) -> Path:
    """Write a PIL image as PNG via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: image.save(p, format="PNG"))
    return path


def save_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def save_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def check_same_settings(folder: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """A resumed run folder must hold a run with the same settings, or two runs would mix in one
    result; the error lists what changed (``key: old -> new``)."""
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        changes = ", ".join(f"{k}: {_short(saved.get(k))} -> {_short(current.get(k))}" for k in differ)
        raise AtomtuneError(
            f"{folder} holds a run with other settings ({changes}); use another output folder"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
