"""``rankings.json``, what ``atomtune atoms`` writes: per module, the atoms by importance.

Its own module because ``analyze`` writes the file and ``generate`` reads it (top-k masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atomtune.errors import AtomtuneError
from atomtune.io import read_json


def read_rankings(source: str | Path | dict) -> dict[str, Any]:
    data = source if isinstance(source, dict) else read_json(source, "rankings file")
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        raise AtomtuneError("not a rankings file of `atomtune atoms` (no 'modules')")
    return data
