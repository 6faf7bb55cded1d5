"""Writing images and JSON atomically, and labelled image grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def grid(
    rows: Sequence[Sequence[Any]],
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    pad: int = 2,
):
    """Tile PIL images (rows x columns, all the same size) with optional labels above and left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = rows[0][0].size
    columns = max(len(r) for r in rows)
    top = 14 if column_labels else 0
    left = 0
    if row_labels:
        left = min(max(6 * len(label) for label in row_labels) + 6, 240)
    out = Image.new(
        "RGB",
        (left + columns * (w + pad) + pad, top + len(rows) * (h + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(column_labels or []):
        draw.text((left + pad + j * (w + pad), 1), str(label), fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((2, y + h // 2 - 5), str(row_labels[i])[:40], fill="black", font=font)
        for j, image in enumerate(row):
            out.paste(image, (left + pad + j * (w + pad), y))
    return out
