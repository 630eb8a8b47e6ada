"""The IDX format (MNIST's): a strict streaming reader that never reads past the size its header declares."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import DataError, read_error

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: 3-D uint8 images, 0x00000801: 1-D uint8 labels
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


MAX_IDX_BYTES = 4 << 30  # 4 GiB of pixels: more than any IDX dataset; convert larger data to .npy (memory-mapped)


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or .gz) strictly: magic, header and exact size are all checked.

    The file is read as a stream and never past the size its header declares, so a small .gz that inflates to
    gigabytes (a decompression bomb) costs no more memory than the header's honest size.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            return _read_idx_stream(f, str(path), expect_magic)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    except OSError as exc:
        raise read_error(path, exc, "IDX file") from None


def parse_idx(raw: bytes, name: str = "<bytes>", expect_magic: int | None = None) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file into a C-ordered array in native byte order."""
    return _read_idx_stream(io.BytesIO(raw), name, expect_magic)


def _read_exactly(f, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        step = f.readinto(view[got:])
        if not step:
            break
        got += step
    return bytes(buf[:got]) if got < n else buf


def _read_idx_stream(f, name: str, expect_magic: int | None) -> np.ndarray:
    head = _read_exactly(f, 4)
    if len(head) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(head)} bytes, no header)")
    zero, type_code, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    magic = int.from_bytes(head, "big")
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{name}: bad magic number 0x{magic:08x}, not an IDX file (inputs are .npy, .npz, .csv, "
                        ".parquet, IDX(.gz), PNG/JPEG images or a folder of them, told apart by suffix)")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{name}: bad magic number {magic}, expected {expect_magic}")
    header = 4 + 4 * ndim
    raw_dims = _read_exactly(f, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{name}: truncated IDX header ({4 + len(raw_dims)} bytes, {ndim} dims need {header})")
    dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    body = math.prod(dims) * dtype.itemsize  # Python ints: dims of 2^32-1 cannot overflow
    if body > MAX_IDX_BYTES:
        raise DataError(f"{name}: header dims {dims} declare {body:,} bytes, over the {MAX_IDX_BYTES >> 30} GiB "
                        "limit for IDX files; the file is corrupt, or convert it to .npy")
    payload = _read_exactly(f, body)
    if len(payload) < body:
        raise DataError(f"{name}: truncated: {header + len(payload)} bytes, header dims {dims} need exactly "
                        f"{header + body}")
    if f.read(1):
        raise DataError(f"{name}: size mismatch: more data than the header dims {dims} declare "
                        f"({header + body} bytes)")
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def sha256_idx(arr: np.ndarray, stem: str) -> str:
    """SHA-256 of the uncompressed IDX bytes an array came from (uint8 image/label files)."""
    magic = IMAGES_MAGIC if stem.split("-")[1].startswith("images") else LABELS_MAGIC
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return hashlib.sha256(header + np.ascontiguousarray(arr).tobytes()).hexdigest()
