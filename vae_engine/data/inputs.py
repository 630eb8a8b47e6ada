"""The one input rule: items of any accepted kind -> float32 (N, D) in model units, checked (shape, dtype, NaN/Inf,
range): `items` for a model's inputs, `latents` for latent arrays, `model_input` for the values alone. The CLI's
jobs, the Python API (the Engine), the server and the detector's scoring all call it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import DataError
from ..core.fastmath import loaded, njit

if TYPE_CHECKING:
    import torch


SPAN_KERNEL_MAX = 4096  # elements: below this one Numba pass beats NumPy's two passes (`span`, `to_float`)


@njit(cache=True, nogil=True)
def _span(a):
    """(min, max, all finite) of a float32 array in one pass (compiled on first use: the CLI starts without Numba)."""
    lo, hi, nan = np.float32(np.inf), np.float32(-np.inf), np.float32(0.0)
    for v in a.ravel():
        nan += v - v  # NaN for NaN and +-Inf, 0 for every finite value
        lo, hi = min(lo, v), max(hi, v)
    return lo, hi, nan == 0.0


@njit(cache=True, nogil=True)
def _unit(a):  # (N, D) uint8
    """uint8 -> float32 intensity / 255 in one pass: IEEE division, the same quotient as NumPy's (tested on every
    value); compiled on first use."""
    out = np.empty(a.shape, np.float32)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i, j] = np.float32(a[i, j]) / np.float32(255.0)
    return out


def warm() -> None:
    """Load the input rule's kernels (from Numba's cache) on two tiny arrays."""
    _span(np.zeros(1, np.float32))
    _unit(np.zeros((1, 1), np.uint8))


def span(flat: np.ndarray) -> tuple[float, float, bool]:
    """(min, max, all finite) of float32 values. Small arrays (batch-1 requests): one Numba pass, 2.4 us against
    9.3 us for NumPy's min and max at 784 values, and it leaves the runtime's call after it as fast as a bare call
    (NumPy's reductions before an ONNX Runtime call slowed that call by ~10 us, measured on the 2-core AVX2 EPYC).
    Large ones: NumPy's vectorized reductions (1 ns per value against 0.16), NaN and Inf propagating. Before
    Numba is loaded (`fastmath.loaded`: a job that runs no other kernel, a server still warming up), NumPy's, which
    give the same answer, so no process loads Numba for a few microseconds."""
    if flat.size <= SPAN_KERNEL_MAX and flat.dtype == np.float32 and loaded():
        lo, hi, finite = _span(flat)
        return float(lo), float(hi), bool(finite)
    lo, hi = float(flat.min()), float(flat.max())  # NaN propagates into both
    return lo, hi, math.isfinite(lo) and math.isfinite(hi)


def float32(a: np.ndarray, copy: bool = False) -> np.ndarray:
    """Contiguous float32 of any numbers (a new array with `copy`), quietly: values beyond float32's range become
    Inf (no NumPy overflow warning), which the input rule then refuses with the row that holds it."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(a, np.float32, order="C") if copy else np.ascontiguousarray(a, dtype=np.float32)


def in_range(flat: np.ndarray, unit_interval: bool) -> bool:
    """Are all values finite, and (`unit_interval`) in [0, 1]? One `span` pass."""
    lo, hi, finite = span(flat)
    return finite and (not unit_interval or (lo >= 0.0 and hi <= 1.0))


def to_float(items: np.ndarray) -> np.ndarray:
    """Items (N, ...) -> float32 (N, D) in model units: uint8 is intensity / 255, anything else as is."""
    flat = items.reshape(len(items), math.prod(items.shape[1:]))  # (not -1: an empty batch has no size to divide)
    if flat.dtype == np.uint8:
        if flat.size <= SPAN_KERNEL_MAX and loaded():  # batch 1: one Numba pass, 1.3 us against NumPy's 2.3
            return _unit(flat)
        return np.divide(flat, np.float32(255.0), dtype=np.float32)
    return float32(flat)


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
    if flat.size == 0 or chunk.dtype == np.uint8:  # intensity / 255: finite and in [0, 1] by construction
        return flat
    if in_range(flat, unit_interval):
        return flat
    bad = ~np.isfinite(flat)
    if bad.any():
        row = start + int(np.argwhere(bad)[0][0])
        raise DataError(f"{name}: NaN or Inf in row {row} (or a value beyond float32's range); clean the input "
                        "first")
    if unit_interval and (flat.min() < 0.0 or flat.max() > 1.0):
        raise DataError(f"{name}: values must lie in [0, 1] for this model, found {flat.min():g}..{flat.max():g} "
                        f"near row {start}; scale 0..255 data by 1/255 or save it as uint8")
    return flat


def items(x, cfg, unit_interval: bool, name: str = "x", start: int = 0) -> np.ndarray:
    """Items for a model (`cfg`: its ModelConfig) by the input rule: shape (N, *input_shape) or flattened (N, D),
    then `model_input` -> contiguous float32 (N, D) in model units (no copy when the input already is)."""
    a = np.asarray(x)
    shape, d = cfg.input_shape, cfg.input_dim
    if (a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == d and a.flags.c_contiguous and a.size
            and in_range(a, unit_interval)):
        return a  # already model units (a batch-1 request, a prepared batch); anything wrong: the path below says
    if a.ndim < 2 or not cfg.accepts(a.shape[1:]):
        raise DataError(f"{name} must have shape (N, {', '.join(map(str, shape))})"
                        + (f" or (N, {d})" if len(shape) > 1 else "") + f" for this model, got {a.shape}")
    return np.ascontiguousarray(model_input(a, unit_interval, name, start))


def check_fits(item_shape: tuple[int, ...], cfg, name: str) -> None:
    """Do items of this shape fit the model (its own shape, or flattened to its D values)? A DataError naming the
    source otherwise: the one test of "does this data fit this model" (jobs, evaluate, the request checks)."""
    if not cfg.accepts(tuple(item_shape)):
        raise DataError(f"{name}: items of shape {tuple(item_shape)} do not fit this model, which takes "
                        f"{tuple(cfg.input_shape)} (or {cfg.input_dim} values per row)")


def latents(z, shape: int | tuple[int, ...], name: str = "z") -> np.ndarray:
    """Latent-space arrays (z, mu, logvar) by the input rule: finite floats of shape (N, *shape) (a model's
    latent_shape, e.g. (4, 32, 32)) or flattened (N, L) -> contiguous float32 (N, L)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dim = math.prod(shape)
    a = np.asarray(z)
    if a.ndim < 2 or a.shape[1:] not in (shape, (dim,)) or a.dtype.kind != "f":
        expected = f"(N, {', '.join(map(str, shape))})" + (f" or (N, {dim})" if len(shape) > 1 else "")
        raise DataError(f"{name} must be float of shape {expected}, got {a.dtype} {a.shape}")
    a = float32(a.reshape(len(a), dim))
    if not span(a)[2]:
        raise DataError(f"{name} holds NaN or Inf values (or values beyond float32's range)")
    return a
