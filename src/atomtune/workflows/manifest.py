"""``manifest.json``: what a generation folder holds, one record per image.

A generation folder (what ``atomtune generate`` writes, and what ``atomtune eval`` reads) is any
folder with a ``manifest.json`` and the images it names, at paths relative to the folder::

    {
      "format": "atomtune-generations",
      "format_version": 1,
      "metadata": {"unique_token": "sks", "base_model": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"},
      "images": [
        {"file": "atoms/dog/00_a-sks-dog-in-the-jungle/seed0.png", "subject": "dog",
         "prompt": "a sks dog in the jungle", "seed": 0, "method": "atoms",
         "adapter": "runs/dog/adapter"},
        ...
      ]
    }

Records (``ImageRecord``):

- ``file``: path of the image relative to the folder, with ``/`` separators, inside the folder;
- ``subject``: the subject's name (a DreamBooth folder name such as ``dog`` or ``rc_car``);
- ``prompt``: the prompt as given to the model, unique token included;
- ``seed``: the integer seed of the generator for this image (results are reproducible from it);
- ``method``: a free label for what made the image (``atoms``, ``lora``, ``base`` ...);
- ``adapter``: optional, the adapter folder that was active (``null`` when none).

``metadata`` is a free JSON object for the generating run; one key is read back: ``unique_token``
(the word ``atomtune eval`` strips from prompts before CLIP-T; ``sks`` when absent). The suggested
file layout is ``default_image_path``: ``METHOD/SUBJECT/NN_prompt-slug/seedS.png``; only the
manifest is authoritative. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write, check_fields, read_json

MANIFEST_NAME = "manifest.json"
FORMAT = "atomtune-generations"
FORMAT_VERSION = 1
_TOP_LEVEL = {"format", "format_version", "metadata", "images"}


@dataclass(frozen=True)
class ImageRecord:
    file: str
    subject: str
    prompt: str
    seed: int
    method: str
    adapter: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name for f in fields(ImageRecord)}
_REQUIRED = _FIELDS - {"adapter"}


@dataclass(frozen=True)
class Manifest:
    folder: Path
    records: tuple[ImageRecord, ...]
    metadata: dict[str, Any]

    def path(self, record: ImageRecord) -> Path:
        return self.folder / record.file

    def groups(self) -> dict[tuple[str, str], list[ImageRecord]]:
        """Records by ``(method, subject)``, in first-seen order."""
        out: dict[tuple[str, str], list[ImageRecord]] = {}
        for r in self.records:
            out.setdefault((r.method, r.subject), []).append(r)
        return out


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of a prompt: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-") or "prompt"


def default_image_path(method: str, subject: str, prompt_index: int, prompt: str, seed: int) -> str:
    """The suggested relative path of one image: ``METHOD/SUBJECT/NN_prompt-slug/seedS.png``."""
    return f"{slug(method)}/{subject}/{prompt_index:02d}_{slug(prompt)}/seed{seed}.png"


def _record(raw: Any, where: str) -> ImageRecord:
    if isinstance(raw, ImageRecord):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise AtomtuneError(f"{where} must be an object with {', '.join(sorted(_FIELDS))}")
    check_fields(dict(raw), _FIELDS, _REQUIRED, where)
    for key in ("file", "subject", "prompt", "method"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise AtomtuneError(f"{where}: {key} must be a non-empty string, got {raw[key]!r}")
    if not isinstance(raw["seed"], int) or isinstance(raw["seed"], bool):
        raise AtomtuneError(f"{where}: seed must be an integer, got {raw['seed']!r}")
    adapter = raw.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise AtomtuneError(f"{where}: adapter must be a string or null, got {adapter!r}")
    file = PurePosixPath(raw["file"])
    if file.is_absolute() or ".." in file.parts or "\\" in raw["file"]:
        raise AtomtuneError(f"{where}: file must be a relative path inside the folder, got {raw['file']!r}")
    return ImageRecord(str(file), raw["subject"], raw["prompt"], raw["seed"], raw["method"], adapter)


def _check(records: list[ImageRecord], folder: Path, source: str, check_files: bool) -> None:
    seen: set[str] = set()
    for i, r in enumerate(records):
        if r.file in seen:
            raise AtomtuneError(f"{source}: image {r.file} is listed twice")
        seen.add(r.file)
        if check_files and not (folder / r.file).is_file():
            raise AtomtuneError(f"{source}: image {i} ({r.file}) is missing from {folder}")


def write_manifest(
    folder: str | Path,
    records: Iterable[ImageRecord | Mapping[str, Any]],
    metadata: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> Path:
    """Validate ``records`` (and, by default, that every image exists) and write ``folder/manifest.json``."""
    folder = Path(folder)
    checked = [_record(r, f"record {i}") for i, r in enumerate(records)]
    _check(checked, folder, "manifest", check_files)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": dict(metadata or {}),
        "images": [r.to_dict() for r in checked],
    }
    try:
        text = json.dumps(payload, indent=2) + "\n"
    except TypeError as exc:
        raise AtomtuneError(f"manifest metadata must be plain JSON values ({exc})") from exc
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    atomic_write(path, lambda p: p.write_text(text))
    return path


def read_manifest(folder: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate ``folder/manifest.json``; by default every image it names must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AtomtuneError(f"generation folder not found: {folder}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise AtomtuneError(f"{path} is missing: not a generation folder (atomtune generate writes one)")
    payload = check_fields(read_json(path), _TOP_LEVEL, _TOP_LEVEL, str(path))
    if payload["format"] != FORMAT:
        raise AtomtuneError(f"{path} has format {payload['format']!r}, expected {FORMAT!r}")
    if payload["format_version"] != FORMAT_VERSION:
        raise AtomtuneError(
            f"{path} has format_version {payload['format_version']}, this atomtune reads {FORMAT_VERSION}"
        )
    if not isinstance(payload["metadata"], dict):
        raise AtomtuneError(f"{path}: metadata must be an object")
    if not isinstance(payload["images"], list):
        raise AtomtuneError(f"{path}: images must be a list")
    records = [_record(r, f"{path}: image {i}") for i, r in enumerate(payload["images"])]
    _check(records, folder, str(path), check_files)
    return Manifest(folder, tuple(records), payload["metadata"])
