"""The speed command's arguments for a CI-sized run: one measurement per figure, no warm-up."""

from __future__ import annotations


def cheap(tmp_path, *extra: str, preset: str = "cpu-tiny") -> list[str]:
    return [
        "--preset",
        preset,
        "--device",
        "cpu",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
        *extra,
    ]
