"""The DreamBooth dataset: subjects, classes, the 25 evaluation prompts, and the unique token.

The dataset (https://github.com/google/dreambooth) is a folder ``dataset/`` with one sub-folder of
4-6 real images per subject (30 subjects) and ``prompts_and_classes.txt``, which holds

- a ``subject_name,class`` table (``dog,dog``, ``bear_plushie,stuffed animal``, ...),
- 25 *object* prompts and 25 *live subject* prompts, written as Python
  ``'a {0} {1} in the jungle'.format(unique_token, class_token)``.

Live subjects are the dogs and cats (the dataset's README: "9 out of these subjects are live
subjects (dogs and cats) and 21 are objects"); the file itself does not mark them, so a subject is
live when its class is ``dog`` or ``cat``. ``{0}`` is the unique token (``sks`` by default, as in
the diffusers DreamBooth examples) and ``{1}`` the class noun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from atomtune.errors import AtomtuneError
from atomtune.io import IMAGE_SUFFIXES, list_images

PROMPTS_FILE = "prompts_and_classes.txt"
DEFAULT_TOKEN = "sks"
LIVE_CLASSES = frozenset({"dog", "cat"})

_TEMPLATE = re.compile(r"""^\s*(['"])(.*\{0\}.*\{1\}.*)\1\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


@dataclass(frozen=True)
class Subject:
    """One DreamBooth subject: its name (the folder), class noun, kind, and real images."""

    name: str
    class_name: str
    live: bool
    folder: Path
    images: tuple[Path, ...]


@dataclass(frozen=True)
class DreamBoothDataset:
    root: Path  # the folder that holds prompts_and_classes.txt and the subject folders
    subjects: dict[str, Subject]
    object_prompts: tuple[str, ...]  # templates with {0} = unique token, {1} = class noun
    live_prompts: tuple[str, ...]

    def templates(self, subject: str) -> tuple[str, ...]:
        return self.live_prompts if self.subject(subject).live else self.object_prompts

    def prompts(self, subject: str, token: str = DEFAULT_TOKEN) -> list[str]:
        """The 25 evaluation prompts of ``subject`` with the unique token and its class filled in."""
        s = self.subject(subject)
        return [t.format(token, s.class_name) for t in self.templates(subject)]

    def subject(self, name: str) -> Subject:
        if name not in self.subjects:
            raise AtomtuneError(
                f"unknown DreamBooth subject {name!r}; the dataset has: {', '.join(self.subjects)}"
            )
        return self.subjects[name]

    def select(self, names: list[str] | None) -> list[Subject]:
        """The named subjects (all when ``names`` is empty), each checked to have real images."""
        chosen = [self.subject(n) for n in names] if names else list(self.subjects.values())
        for s in chosen:
            if not s.folder.is_dir():
                raise AtomtuneError(f"subject folder not found: {s.folder}")
            if not s.images:
                raise AtomtuneError(
                    f"subject folder {s.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                )
        return chosen


def find_dataset_root(path: str | Path) -> Path:
    """Accept the dataset repository (with ``dataset/`` inside) or the ``dataset/`` folder itself."""
    path = Path(path)
    for candidate in (path, path / "dataset"):
        if (candidate / PROMPTS_FILE).is_file():
            return candidate
    if not path.exists():
        raise AtomtuneError(f"DreamBooth dataset folder not found: {path}")
    raise AtomtuneError(
        f"{path} is not a DreamBooth dataset: no {PROMPTS_FILE} in it or in {path / 'dataset'}"
    )


def parse_prompts_and_classes(
    text: str, source: str = PROMPTS_FILE
) -> tuple[dict[str, str], list[str], list[str]]:
    """``(subject → class, object templates, live templates)`` from the text of ``prompts_and_classes.txt``."""
    classes: dict[str, str] = {}
    object_prompts: list[str] = []
    live_prompts: list[str] = []
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered == "classes":
            section = "classes"
        elif lowered == "object prompts":
            section = "object"
        elif lowered == "live subject prompts":
            section = "live"
        elif section == "classes" and "," in line and lowered != "subject_name,class":
            name, cls = (part.strip() for part in line.split(",", 1))
            classes[name] = cls
        elif section in ("object", "live") and (match := _TEMPLATE.match(line)):
            (object_prompts if section == "object" else live_prompts).append(match.group(2))
    if not classes:
        raise AtomtuneError(f"{source}: no 'subject_name,class' table found")
    for kind, prompts in (("object", object_prompts), ("live subject", live_prompts)):
        if not prompts:
            raise AtomtuneError(f"{source}: no {kind} prompts found")
    return classes, object_prompts, live_prompts


def load_dreambooth(path: str | Path) -> DreamBoothDataset:
    """Read the dataset's subjects, classes and prompts (the images are listed, not opened)."""
    root = find_dataset_root(path)
    file = root / PROMPTS_FILE
    from atomtune.diffusion.data import read_text_file

    text = read_text_file(file, "prompts file")
    classes, object_prompts, live_prompts = parse_prompts_and_classes(text, str(file))
    subjects = {}
    for name, cls in classes.items():
        folder = root / name
        images = tuple(list_images(folder, "subject images", allow_empty=True)) if folder.is_dir() else ()
        subjects[name] = Subject(name, cls, cls in LIVE_CLASSES, folder, images)
    return DreamBoothDataset(root, subjects, tuple(object_prompts), tuple(live_prompts))


def strip_token(prompt: str, token: str = DEFAULT_TOKEN) -> str:
    """The prompt without the unique token (whole words only), spaces collapsed.

    ``strip_token("a sks dog in the snow") == "a dog in the snow"``; "sksx" or "tasks" stay, "sks," loses the word and keeps the comma.
    CLIP-T scores the image against this text: the token means nothing to CLIP.
    """
    if not token:
        return " ".join(prompt.split())
    stripped = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    return re.sub(r"\s+([,.;:!?])", r"\1", " ".join(stripped.split()))
