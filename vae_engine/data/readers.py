"""Readers for a user's own data: .npy/.npz, .csv, .parquet, IDX(.gz), PNG/JPEG images and folders of them.

Every reader returns `(items, labels)`: items (N, *item_shape) as uint8 (images, read as intensity / 255) or
float32, with item_shape (D,) for tables and (C, H, W) for images; labels (N,) or None. Every failure is a
DataError naming the file and the problem.
"""

from __future__ import annotations

import csv
import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import DataError, first_line, read_error
from .inputs import float32

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_KEYS = ("x", "X", "data", "images", "features", "items", "latents")  # .npz/.safetensors: the array
LABEL_KEYS = ("y", "labels", "targets")  # .npz: optional labels
MAX_IMAGE_PIXELS = 1 << 24  # per image, checked from the header before decoding


def read(path: str | Path, columns: Sequence[str] | None = None,
         resize: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Items and labels of any supported file or folder (see the module docstring): a folder of images, else the
    reader its suffix names in READERS (IDX for any other name: MNIST-style files have none)."""
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path, resize)
    if not path.exists():
        raise DataError(f"{path}: not found")
    suffix = ("".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix).lower()
    if columns and suffix not in COLUMN_SUFFIXES:
        raise DataError(f"{path}: --columns applies to {' and '.join(COLUMN_SUFFIXES)} files only")
    items, labels = READERS.get(suffix, _read_idx)(path, columns, resize)
    return as_items(items, str(path)), labels


def load_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy array (never a pickle); a clear DataError for anything else."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError as exc:
        raise read_error(path, exc, ".npy file") from None
    except (ValueError, OSError, EOFError, TypeError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({first_line(exc, 200)})") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for a zip archive, whatever the name
        if hasattr(arr, "close"):
            arr.close()
        raise DataError(f"{path}: is a .npz archive, not a .npy array; save one array with np.save")
    return arr


def as_items(arr: np.ndarray, name: str) -> np.ndarray:
    """(N, D) tables and (N, H, W), (N, C, H, W) or (N, H, W, C) images -> (N, D) or (N, C, H, W)."""
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(f"{name}: dtype {arr.dtype} is not numeric")
    if arr.ndim < 2 or len(arr) == 0:
        raise DataError(f"{name}: expected N items of shape (D,), (H, W) or (C, H, W), got an array of shape "
                        f"{arr.shape}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3, 4) and arr.shape[3] in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # channels last -> first
    elif arr.ndim > 4:
        raise DataError(f"{name}: {arr.ndim}-D items are not supported (shape {arr.shape})")
    return np.ascontiguousarray(arr) if arr.dtype == np.uint8 else float32(arr, copy=True)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            key = next((k for k in ARRAY_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataError(f"{path}: holds {keys}; name the items one of {', '.join(ARRAY_KEYS)}")
            items = archive[key]
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            labels = archive[label_key] if label_key else None
    except DataError:
        raise
    except PermissionError as exc:
        raise read_error(path, exc, ".npz file") from None
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({first_line(exc, 200)})") from None
    if labels is not None and (labels.ndim != 1 or len(labels) != len(items)):
        raise DataError(f"{path}: labels of shape {labels.shape} do not match {len(items)} items")
    return items, labels


def read_safetensors(path: Path, keys: Sequence[str] = ARRAY_KEYS) -> np.ndarray:
    """The array of a .safetensors file (what a job's .safetensors output holds): its one tensor, or the one named
    by the first of `keys` it has; read as NumPy (the format holds raw tensors only: no code, no pickle)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            key = next((k for k in keys if k in names), names[0] if len(names) == 1 else None)
            if key is None:
                raise DataError(f"{path}: holds {names[:5]}; name the array one of {', '.join(keys)}")
            return f.get_tensor(key)
    except DataError:
        raise
    except PermissionError as exc:
        raise read_error(path, exc, ".safetensors file") from None
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise DataError(f"{path}: not a readable .safetensors file ({first_line(exc, 200)})") from None


def _pick_columns(names: list[str], columns: Sequence[str] | None, path: Path) -> list[int]:
    if not columns:
        return list(range(len(names)))
    picked = []
    for col in columns:
        if col in names:
            picked.append(names.index(col))
        elif col.isdigit() and int(col) < len(names):
            picked.append(int(col))
        else:
            raise DataError(f"{path}: no column {col!r}; the columns are {', '.join(names[:20])}")
    return picked


def _csv_rows(path: Path, limit: int | None = None) -> list[tuple[int, list[str]]]:
    """The non-empty rows of a CSV with their row index in the file (the first `limit` of them); one DataError for
    an empty, unreadable, non-UTF-8 or malformed file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = ((i, row) for i, row in enumerate(csv.reader(f)) if row and any(c.strip() for c in row))
            out = list(itertools.islice(rows, limit))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; is it really a CSV?") from None
    except OSError as exc:
        raise read_error(path, exc, "CSV file") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from None
    if not out:
        raise DataError(f"{path}: the file is empty")
    return out


def _csv_names(first: list[str]) -> tuple[bool, list[str]]:
    """(has a header, column names): a first row that is not all numbers is the header; else columns 0, 1, ..."""
    header = not all(_is_number(cell) for cell in first)
    return header, [c.strip() for c in first] if header else [str(i) for i in range(len(first))]


def _read_csv(path: Path, columns: Sequence[str] | None) -> np.ndarray:
    """Numeric columns of a CSV; a first row that is not all numbers is the header.

    A well-formed file (every column numeric, every row as wide as the first) is parsed by NumPy's C reader
    (`np.loadtxt`: 20,000 x 100 values in ~0.4 s, float32, no Python object per cell); anything else is read again
    row by row (`_read_csv_rows`), which names the row and column at fault."""
    ((index, first),) = _csv_rows(path, limit=1)
    header, names = _csv_names(first)
    picked = _pick_columns(names, columns, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": the exact error follows
            out = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2, comments=None, quotechar='"',
                             skiprows=index + header, encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError):
        return _read_csv_rows(path, columns)
    if out.shape[1] != len(names) or not len(out):
        return _read_csv_rows(path, columns)  # a header row alone, or rows of another width: the exact error
    return np.ascontiguousarray(out[:, picked]) if picked != list(range(len(names))) else out


def _read_csv_rows(path: Path, columns: Sequence[str] | None) -> np.ndarray:
    """`_read_csv` cell by cell, for files NumPy's reader refuses: the error names the row and column."""
    rows = [row for _, row in _csv_rows(path)]
    header, names = _csv_names(rows[0])
    body = rows[1:] if header else rows
    if not body:
        raise DataError(f"{path}: a header row and no data rows")
    picked = _pick_columns(names, columns, path)
    out = np.empty((len(body), len(picked)), np.float32)
    for r, row in enumerate(body):
        if len(row) != len(names):
            raise DataError(f"{path}: row {r + 1 + header} has {len(row)} fields, the header has {len(names)}")
        for j, c in enumerate(picked):
            try:
                out[r, j] = float(row[c])
            except ValueError:
                raise DataError(f"{path}: column {names[c]!r} is not numeric (row {r + 1 + header}: "
                                f"{row[c][:30]!r}); pick numeric columns with --columns") from None
    return out


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_parquet(path: Path, columns: Sequence[str] | None) -> np.ndarray:
    """Numeric columns of a Parquet file (or one list column of values per row), reading only the columns asked
    for, straight into NumPy (no Python object per value)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        names = pq.read_schema(path).names
        picked = _pick_columns(names, columns, path)
        table = pq.read_table(path, columns=[names[c] for c in picked])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc, 200)})") from None
    cols = []
    for c, column in zip(picked, table.columns, strict=True):
        if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type):  # one list column of values
            cols.append(_list_column(column, names[c], path))
            continue
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_boolean(column.type)):
            raise DataError(f"{path}: column {names[c]!r} is {column.type}, not numeric; pick numeric columns "
                            "with --columns")
        cols.append(column.to_numpy(zero_copy_only=False).astype(np.float32)[:, None])
    if not cols or not len(cols[0]):
        raise DataError(f"{path}: no rows")
    try:
        return np.concatenate(cols, axis=1)
    except ValueError:
        raise DataError(f"{path}: list columns of different lengths") from None


def _list_column(column, name: str, path: Path) -> np.ndarray:
    """A column of equal-length numeric lists as (rows, length) float32, from its flat values and offsets."""
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks()
    if not (pa.types.is_integer(array.type.value_type) or pa.types.is_floating(array.type.value_type)):
        raise DataError(f"{path}: column {name!r} holds lists of {array.type.value_type}, not numbers")
    if array.null_count:
        raise DataError(f"{path}: column {name!r} has missing rows")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise DataError(f"{path}: column {name!r} holds lists of different lengths")
    width = int(lengths[0]) if len(lengths) else 0
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(array), width)


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files of a folder, sorted by name (at least one, or a DataError)."""
    try:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    except OSError as exc:
        raise read_error(folder, exc, "folder") from None
    if not files:
        raise DataError(f"{folder}: no .png or .jpg images in the folder")
    return files


def read_image_folder(folder: Path, resize: tuple[int, int] | None = None) -> tuple[np.ndarray, None]:
    """All PNG/JPEG images of a folder (sorted by name) as uint8 (N, C, H, W); grey gives C=1, colour C=3."""
    files = image_files(folder)
    out: np.ndarray | None = None
    for i, f in enumerate(files):
        pixels = read_image(f, resize)
        if out is None:
            out = np.empty((len(files), *pixels.shape), np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DataError(f"{f}: {_describe(pixels.shape)}, but {files[0].name} is {_describe(out.shape[1:])}; "
                            "all images must match (or pass --resize H,W)")
        out[i] = pixels
    return out, None


def read_image(path: Path, resize: tuple[int, int] | None = None,
               expect: tuple[int, ...] | None = None, fit: bool = False) -> np.ndarray:
    """One image as uint8 (C, H, W): grey stays C=1, anything else becomes RGB; size checked before decoding.
    `fit` (with `expect`): an image of another size is scaled so that it covers the expected (H, W) and
    centre-cropped to it (aspect ratio kept), as image models' preprocessing does."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {w}x{h} pixels is too large (limit {MAX_IMAGE_PIXELS:,})")
            if fit and expect is not None and (h, w) != tuple(expect[1:]):
                eh, ew = expect[1:]
                scale = max(eh / h, ew / w)
                sw, sh = max(ew, round(w * scale)), max(eh, round(h * scale))
                left, top = (sw - ew) // 2, (sh - eh) // 2
                img = img.resize((sw, sh), Image.BICUBIC, box=None).crop((left, top, left + ew, top + eh))
                w, h = ew, eh
            if expect is not None and resize is None and (h, w) != tuple(expect[1:]):
                raise DataError(f"{path}: images must be {expect[2]}x{expect[1]} for this model, got {w}x{h} (--fit "
                                "scales and centre-crops them)")
            grey = img.mode in ("1", "L", "I", "I;16", "F") or (expect is not None and expect[0] == 1)
            img = img.convert("L" if grey else "RGB")
            if resize is not None:
                img = img.resize((resize[1], resize[0]), Image.BILINEAR)
            pixels = np.asarray(img)
    except DataError:
        raise
    except PermissionError as exc:
        raise read_error(path, exc, "image") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, bomb errors)
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {first_line(exc, 150)})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[2]}x{shape[1]} with {shape[0]} channel{'s' if shape[0] > 1 else ''}"


def parse_shape(text: str | None, name: str = "--resize") -> tuple[int, int] | None:
    """'H,W' -> (H, W)."""
    if not text:
        return None
    try:
        h, w = (int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise DataError(f"{name} must be H,W like 32,32, got {text!r}") from None
    if min(h, w) < 1 or h * w > MAX_IMAGE_PIXELS:
        raise DataError(f"{name} must be positive and at most {MAX_IMAGE_PIXELS:,} pixels, got {text!r}")
    return h, w


# an input format: its suffix and its reader (path, columns, resize) -> (items, labels); COLUMN_SUFFIXES take --columns
READERS = {
    ".npy": lambda path, columns, resize: (np.asarray(load_npy(path)), None),
    ".npz": lambda path, columns, resize: _read_npz(path),
    ".safetensors": lambda path, columns, resize: (read_safetensors(path), None),
    ".csv": lambda path, columns, resize: (_read_csv(path, columns), None),
    ".parquet": lambda path, columns, resize: (_read_parquet(path, columns), None),
    **{suffix: lambda path, columns, resize: (read_image(path, resize)[None], None)  # one image: one item
       for suffix in IMAGE_SUFFIXES},
}
COLUMN_SUFFIXES = (".csv", ".parquet")


def _read_idx(path: Path, columns, resize) -> tuple[np.ndarray, None]:
    """IDX, raw or gzipped: any name without a suffix of READERS (MNIST-style files have none)."""
    from .idx import read_idx

    return read_idx(path), None
