"""Writing images: PNG files and labelled grids (uint8 conversion shared with the metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ssr_cli.engine.atomic import atomic_write
from ssr_cli.metrics import to_uint8


def to_hwc_uint8(x: torch.Tensor, quantize: str = "round") -> np.ndarray:
    """(3, H, W) or (N, 3, H, W) in [-1, 1] -> uint8 HWC / NHWC numpy (see metrics.to_uint8 for ``quantize``)."""
    u8 = to_uint8(x.detach().cpu(), quantize)
    return u8.permute(*range(u8.dim() - 3), -2, -1, -3).numpy()


def save_png(x: torch.Tensor, path: str | Path, quantize: str = "round") -> Path:
    """One image (3, H, W) in [-1, 1] -> PNG, written atomically (uint8 by ``quantize``, see metrics.to_uint8)."""
    image = Image.fromarray(to_hwc_uint8(x, quantize))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_grid(rows: list[torch.Tensor], path: str | Path, *, row_labels: list[str] | None = None,
              col_labels: list[str] | None = None, pad: int = 2, min_cell: int = 64) -> Path:
    """Rows of images (each (N, 3, H, W) in [-1, 1], same H, W) -> one labelled PNG grid.

    Small images are upscaled (nearest) to at least ``min_cell`` pixels so the grid is readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_cols = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    zoom = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * zoom, w * zoom
    left = 90 if row_labels else 0
    top = 16 if col_labels else 0
    canvas = Image.new("RGB", (left + n_cols * (cw + pad) + pad, top + len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        tiles = to_hwc_uint8(row)
        for c in range(row.shape[0]):
            tile = Image.fromarray(tiles[c]).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * (cw + pad), top + pad + r * (ch + pad)))
        if row_labels:
            draw.text((4, top + pad + r * (ch + pad) + ch // 2 - 5), row_labels[r][:14], fill="black")
    if col_labels:
        for c, label in enumerate(col_labels[:n_cols]):
            draw.text((left + pad + c * (cw + pad) + 2, 2), label[: max(3, cw // 6)], fill="black")
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
