"""Image files: writing PNGs and labelled grids (uint8 conversion shared with the metrics), reading
(noisy, clean) image pairs from two folders, and random crops of the images read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from ssr_cli.engine.atomic import atomic_write
from ssr_cli.errors import UserFileNotFoundError, UserValueError, one_line
from ssr_cli.metrics.pixel import to_uint8


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


def _read_rgb(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:  # PIL's errors for a bad image file
        raise UserValueError(f"{path}: not a readable image ({one_line(exc)}); replace it or remove the pair") from None
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def load_image_pairs(noisy_dir: str | Path, clean_dir: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(noisy, clean) image pairs (3, H, W) in [−1, 1] from two folders, matched by the file name's trailing index.

    Files like ``NOISY/NOISY_3.png`` ↔ ``GT/GT_3.png`` (the SIDD layout in ../shared/data/sidd_pairs) pair by the
    text after the last '_' of the stem; folders whose files share full names pair by name. Sorted by index.
    """
    noisy_dir, clean_dir = Path(noisy_dir), Path(clean_dir)
    for d in (noisy_dir, clean_dir):
        if not d.is_dir():
            raise UserFileNotFoundError(f"image pair folder not found: {d}")

    def keyed(folder: Path) -> dict[str, Path]:
        files = [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")]
        return {p.stem.rsplit("_", 1)[-1]: p for p in files}

    noisy, clean = keyed(noisy_dir), keyed(clean_dir)
    keys = sorted(set(noisy) & set(clean), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    missing = sorted(set(noisy) ^ set(clean))
    if not keys:
        raise UserFileNotFoundError(f"no matching image pairs between {noisy_dir} and {clean_dir}")
    if missing:
        raise UserFileNotFoundError(f"unpaired images (keys {missing[:5]}) between {noisy_dir} and {clean_dir}")
    pairs = []
    for k in keys:
        a, b = _read_rgb(noisy[k]), _read_rgb(clean[k])
        if a.shape != b.shape:
            raise UserValueError(f"pair {k}: noisy {tuple(a.shape)} and clean {tuple(b.shape)} differ in size")
        pairs.append((a, b))
    return pairs


def random_crops(images: Sequence[torch.Tensor], size: int, count: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random size×size crops (count, 3, size, size) drawn uniformly from images (3, H, W) ≥ size."""
    out = []
    for _ in range(count):
        img = images[int(torch.randint(len(images), (), generator=generator))]
        h, w = img.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"crop size {size} exceeds an image of {h}×{w}")
        top = int(torch.randint(h - size + 1, (), generator=generator))
        left = int(torch.randint(w - size + 1, (), generator=generator))
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)
