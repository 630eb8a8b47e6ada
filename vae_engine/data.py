"""Datasets: a strict IDX reader, the bundled MNIST copy, optional downloads, and binarization."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .config import IMAGE_SHAPE
from .errors import DataError, read_error

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: 3-D uint8 images, 0x00000801: 1-D uint8 labels
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Datasets fetched only with --download, from their maintainers' mirrors. The MD5 sums of the .gz files are
# the ones the maintainers publish (and torchvision checks); the files are also re-read by the strict reader.
DOWNLOADS = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "kmnist": (
        "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
        {
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
    ),
}
DATASETS = ("mnist", *DOWNLOADS)


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
        raise DataError(f"{name}: bad magic number 0x{magic:08x}, not an IDX file")
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


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz); a dataset folder needs the four IDX files")


def _checksums(folder: Path) -> dict[str, str]:
    """The `sha256sum`-format SHA256SUMS of a dataset folder, if it has one."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return {}
    try:
        lines = sums.read_bytes()[: 1 << 20].decode("utf-8", "replace").splitlines()
    except OSError as exc:
        raise read_error(sums, exc) from None
    out = {}
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{sums}: line {number} is not '<sha256> <file name>'; fix or delete the file")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def load_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of one split of an IDX folder, checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    image_stem, label_stem = SPLITS[split]
    image_path, label_path = _find(folder, image_stem), _find(folder, label_stem)
    images = read_idx(image_path, IMAGES_MAGIC)
    labels = read_idx(label_path, LABELS_MAGIC)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{image_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path.name}")
    if labels.size and labels.max() > 9:
        raise DataError(f"{label_path}: labels must be 0-9, found {int(labels.max())}")
    if len(images) == 0:
        raise DataError(f"{image_path}: the file holds no images")
    sums = _checksums(folder)
    for path, arr, stem in ((image_path, images, image_stem), (label_path, labels, label_stem)):
        if stem in sums and sha256_idx(arr, stem) != sums[stem]:
            raise DataError(f"{path}: SHA-256 does not match {folder / 'SHA256SUMS'}; the file is corrupt")
    return images, labels


def sha256_idx(arr: np.ndarray, stem: str) -> str:
    """SHA-256 of the uncompressed IDX bytes an array came from (uint8 image/label files)."""
    magic = IMAGES_MAGIC if stem.split("-")[1].startswith("images") else LABELS_MAGIC
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return hashlib.sha256(header + np.ascontiguousarray(arr).tobytes()).hexdigest()


def bundled_dir() -> Path:
    """The MNIST copy shipped inside the package."""
    return Path(str(resources.files("vae_engine") / "assets" / "mnist"))


def cache_dir() -> Path:
    """Where --download puts datasets: $VAE_ENGINE_CACHE, else ~/.cache/vae-engine."""
    return Path(os.environ.get("VAE_ENGINE_CACHE", Path.home() / ".cache" / "vae-engine"))


def download(name: str, timeout: float = 60.0) -> Path:
    """Fetch a named dataset's four IDX files into the cache (MD5-checked); return the folder."""
    if name not in DOWNLOADS:
        raise DataError(f"no download for {name!r}: choose one of {', '.join(DOWNLOADS)}")
    base, files = DOWNLOADS[name]
    folder = cache_dir() / name
    for filename, md5 in files.items():
        target = folder / filename
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        try:
            with urllib.request.urlopen(base + filename, timeout=timeout) as response:
                payload = response.read()
        except OSError as exc:
            raise DataError(f"downloading {base + filename} failed ({exc}); check the network or use --data-dir") \
                from None
        if hashlib.md5(payload).hexdigest() != md5:
            raise DataError(f"{base + filename}: checksum mismatch, the download is corrupt; try again")
        atomic.write_bytes(target, payload)
    return folder


@dataclass(frozen=True)
class Dataset:
    """A dataset held in memory: items (N, *item_shape), uint8 images or float32, and labels if known."""

    name: str
    source: str  # the file or folder it was read from
    train_images: np.ndarray  # (N, D) or (N, C, H, W); IDX datasets keep their (N, 28, 28)
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None
    split: dict | None = None  # how the test split was drawn from the training file, when it was

    @property
    def item_shape(self) -> tuple[int, ...]:
        """One item's shape as the model records it: (D,) or (C, H, W)."""
        shape = self.train_images.shape[1:]
        return (1, *shape) if len(shape) == 2 else tuple(shape)

    def describe(self) -> dict:
        """What config.json records about the data."""
        out = {"name": self.name, "source": self.source, "train": len(self.train_images),
               "test": len(self.test_images), "item_shape": list(self.item_shape),
               "dtype": str(self.train_images.dtype)}
        return {**out, "split": self.split} if self.split else out


def load_training_data(cfg, fetch: bool = False) -> Dataset:
    """The train and test data a TrainConfig names: its --data file or folder (with --test, or the recorded
    seeded --val-fraction split), else an IDX dataset (bundled MNIST by default)."""
    if not cfg.data:
        return load_dataset(cfg.dataset, cfg.data_dir, fetch)
    from . import readers

    resize = tuple(cfg.resize) if cfg.resize else None
    items, labels = readers.read(cfg.data, cfg.columns, resize)
    if cfg.test_data:
        test, test_labels = readers.read(cfg.test_data, cfg.columns, resize)
        if test.shape[1:] != items.shape[1:]:
            raise DataError(f"{cfg.test_data}: items of shape {test.shape[1:]} do not match {cfg.data}'s "
                            f"{items.shape[1:]}")
        return Dataset("file", cfg.data, items, labels, test, test_labels)
    test_idx = split_indices(len(items), cfg.val_fraction, cfg.seed)
    train_idx = np.setdiff1d(np.arange(len(items)), test_idx)
    if len(train_idx) == 0:
        raise DataError(f"{cfg.data}: {len(items)} items leave none for training after --val-fraction "
                        f"{cfg.val_fraction}")
    split = {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "test_indices": test_idx.tolist()}
    train_labels, test_labels = (None, None) if labels is None else (labels[train_idx], labels[test_idx])
    return Dataset("file", cfg.data, items[train_idx], train_labels, items[test_idx], test_labels, split)


def load_test_data(cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """The test items and labels of the data a model was trained on (as `load_training_data` split them)."""
    if cfg.data:
        ds = load_training_data(cfg)
        return ds.test_images, ds.test_labels
    return load_split(resolve_data_dir(cfg.dataset, cfg.data_dir), "test")


def split_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The seeded test split of n items: sorted indices of round(n * fraction) items (at least 1)."""
    count = min(n, max(1, round(n * fraction)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


def to_float(items: np.ndarray) -> np.ndarray:
    """Items (N, ...) -> float32 (N, D) in model units: uint8 is intensity / 255, anything else as is."""
    flat = items.reshape(len(items), -1)
    if flat.dtype == np.uint8:
        return flat.astype(np.float32) / np.float32(255.0)
    return flat.astype(np.float32, copy=False)


def resolve_data_dir(dataset: str = "mnist", data_dir: str | os.PathLike | None = None, fetch: bool = False) -> Path:
    """The folder a dataset is read from: --data-dir, the bundled MNIST, or the download cache."""
    if data_dir is not None:
        return Path(data_dir)
    if dataset == "mnist":
        return bundled_dir()
    if dataset not in DOWNLOADS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}, or give --data-dir")
    if fetch:
        return download(dataset)
    folder = cache_dir() / dataset
    if not folder.is_dir():
        raise DataError(f"{dataset} is not in {folder}: pass --download to fetch it, or --data-dir")
    return folder


def load_dataset(dataset: str = "mnist", data_dir: str | os.PathLike | None = None, fetch: bool = False) -> Dataset:
    """Load train and test splits of a dataset into memory."""
    folder = resolve_data_dir(dataset, data_dir, fetch)
    train_images, train_labels = load_split(folder, "train")
    test_images, test_labels = load_split(folder, "test")
    name = dataset if data_dir is None else "dir"
    return Dataset(name, str(folder), train_images, train_labels, test_images, test_labels)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """Items -> float32 tensor (N, D) in model units (uint8 / 255)."""
    return torch.from_numpy(to_float(images))


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Dynamic binarization: each pixel ~ Bernoulli(intensity), re-sampled on every use; "none" keeps x."""
    if mode == "none":
        return x
    # u < x is Bernoulli(x); 2.5x faster than torch.bernoulli on CPU
    return (torch.rand(x.shape, generator=generator) < x).to(x.dtype)


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
