"""Image grids: items as one picture with thin separators, and a grid written as a PNG file (Pillow). The jobs'
image outputs and the training figures share them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core import atomic
from ..core.config import IMAGE_SHAPE


def image_grid(images: np.ndarray, ncols: int, shape: tuple[int, ...] = (1, *IMAGE_SHAPE), pad: int = 1) -> np.ndarray:
    """Items (N, C*H*W) of `shape` (C, H, W), values in [0, 1] -> one grid image with 1-px white separators:
    (rows*(H+1)+1, ncols*(W+1)+1) for grey, with a trailing RGB axis for colour. Small images are upscaled
    (to about 28 px) so a person can read them."""
    c, h, w = shape
    images = np.asarray(images, dtype=np.float32).reshape(-1, c, h, w).transpose(0, 2, 3, 1)  # (N, H, W, C)
    scale = max(1, 28 // max(h, w))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    nrows = max(1, -(-len(images) // ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid[..., 0] if c == 1 else grid


def displayable(values: np.ndarray) -> np.ndarray:
    """Values for a picture: as they are when in [0, 1], else min-max scaled (real-valued image models)."""
    values = np.asarray(values, np.float32)
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        return values
    return (values - lo) / max(hi - lo, 1e-12)


def save_grid_png(path: str | Path, images: np.ndarray, shape: tuple[int, ...] | None = None,
                  ncols: int | None = None) -> None:
    """Write images as a PNG grid (pixel-exact, grey or RGB, no axes), atomically, with Pillow (no matplotlib:
    a job writing a grid imports what writes a PNG, nothing that draws)."""
    ncols = ncols or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = image_grid(displayable(images), ncols, shape or (1, *IMAGE_SHAPE))
    with atomic.atomic_path(path, ".png") as tmp:
        _write_png(tmp, grid)


def save_png(path: str | Path, item: np.ndarray, shape: tuple[int, ...]) -> None:
    """One item (C*H*W values of `shape`) as a pixel-exact PNG file, values as `displayable` makes them."""
    c, h, w = shape
    image = displayable(item).reshape(c, h, w).transpose(1, 2, 0)
    _write_png(path, image[..., 0] if c == 1 else image)


def _write_png(path: str | Path, image: np.ndarray) -> None:
    """Values in [0, 1] (clipped), (H, W) grey or (H, W, 3) RGB, as 8-bit PNG pixels (Pillow)."""
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB").save(path, format="PNG")
