"""The one input rule: items of any accepted kind -> float32 (N, D) in model units, checked (shape, dtype, NaN/Inf,
range): `items` for a model's inputs, `latents` for latent arrays, `model_input` for the values alone. The CLI's
jobs, the Python API (the Engine), the server and the detector's scoring all call it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import DataError

if TYPE_CHECKING:
    import torch


def to_float(items: np.ndarray) -> np.ndarray:
    """Items (N, ...) -> float32 (N, D) in model units: uint8 is intensity / 255, anything else as is."""
    flat = items.reshape(len(items), -1)
    if flat.dtype == np.uint8:
        return flat.astype(np.float32) / np.float32(255.0)
    return flat.astype(np.float32, copy=False)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """Items -> float32 tensor (N, D) in model units (uint8 / 255)."""
    import torch

    return torch.from_numpy(to_float(images))


def model_input(chunk: np.ndarray, unit_interval: bool = True, name: str = "x", start: int = 0) -> np.ndarray:
    """The one input rule, for the CLI and the Python API alike: items -> float32 (b, D) in model units.

    uint8 is intensity / 255; other numbers are taken as they are; anything else, NaN/Inf, or (for the Bernoulli
    likelihoods, `unit_interval`) values outside [0, 1] are a DataError that names the row.
    """
    chunk = np.asarray(chunk)
    if chunk.dtype.kind not in "biuf":  # bool, int, uint, float: no objects, strings or complex numbers
        raise DataError(f"{name}: dtype {chunk.dtype} not supported; use uint8 (0..255) or float numbers")
    flat = to_float(chunk)
    if flat.size == 0:
        return flat
    lo, hi = float(flat.min()), float(flat.max())  # NaN propagates into both: one pass each when all is well
    if math.isfinite(lo) and math.isfinite(hi) and (not unit_interval or (lo >= 0.0 and hi <= 1.0)):
        return flat
    bad = ~np.isfinite(flat)
    if bad.any():
        row = start + int(np.argwhere(bad)[0][0])
        raise DataError(f"{name}: NaN or Inf in row {row}; clean the input first")
    if unit_interval and (flat.min() < 0.0 or flat.max() > 1.0):
        raise DataError(f"{name}: values must lie in [0, 1] for this model, found {flat.min():g}..{flat.max():g} "
                        f"near row {start}; scale 0..255 data by 1/255 or save it as uint8")
    return flat


def items(x, cfg, unit_interval: bool, name: str = "x", start: int = 0) -> np.ndarray:
    """Items for a model (`cfg`: its ModelConfig) by the input rule: shape (N, *input_shape) or flattened (N, D),
    then `model_input` -> contiguous float32 (N, D) in model units (no copy when the input already is)."""
    a = np.asarray(x)
    shape, d = cfg.input_shape, cfg.input_dim
    if a.ndim < 2 or not cfg.accepts(a.shape[1:]):
        raise DataError(f"{name} must have shape (N, {', '.join(map(str, shape))})"
                        + (f" or (N, {d})" if len(shape) > 1 else "") + f" for this model, got {a.shape}")
    return np.ascontiguousarray(model_input(a, unit_interval, name, start))


def latents(z, latent_dim: int, name: str = "z") -> np.ndarray:
    """Latent-space arrays (z, mu, logvar) by the input rule: finite floats of shape (N, latent_dim) ->
    contiguous float32."""
    a = np.asarray(z)
    if a.ndim != 2 or a.shape[1] != latent_dim or a.dtype.kind != "f":
        raise DataError(f"{name} must be float of shape (N, {latent_dim}), got {a.dtype} {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a.sum(dtype=np.float64)) and not np.isfinite(a).all():  # one reduction when all is well
        raise DataError(f"{name} holds NaN or Inf values")
    return a
