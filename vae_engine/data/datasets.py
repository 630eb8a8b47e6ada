"""Datasets: the bundled MNIST copy, IDX dataset folders (checked against SHA256SUMS), optional downloads, a
user's own data file split into train and test."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..core import atomic
from ..core.config import IMAGE_SHAPE
from ..core.errors import DataError, read_error
from . import readers
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, sha256_idx

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

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


def bundled_dir() -> Path:
    """The MNIST copy shipped inside the package."""
    return Path(str(resources.files("vae_engine") / "assets" / "mnist"))


def cache_dir() -> Path:
    """Where --download puts datasets: the user's cache folder (`config.cache_dir`)."""
    from ..core.config import cache_dir as user_cache

    return user_cache()


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
            import urllib.request  # only a download needs it (~7 ms of every job's start-up)

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


def sample_photos(shape: tuple[int, int, int], n: int = 2) -> np.ndarray:
    """n real photos as float32 (n, C*H*W) in [0, 1], offline: scikit-learn's bundled china.jpg and flower.jpg
    (427x640), square crops (centred, then shifted left and right for more than two) resized with Pillow to (H, W),
    grey for C=1. What an imported image model is checked on (`vae-engine import`) and what `--precision auto`
    measures its paths' reconstruction error on."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    c, h, w = shape
    images = load_sample_images().images
    out = np.empty((n, c * h * w), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        side = min(img.shape[:2])
        room = img.shape[1] - side
        left = (room // 2 + (i // len(images)) * room // 3) % (room + 1)
        top = (img.shape[0] - side) // 2
        pic = Image.fromarray(img[top:top + side, left:left + side]).resize((w, h), Image.BICUBIC)
        a = np.asarray(pic.convert("L" if c == 1 else "RGB"), np.float32) / 255.0
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out[i] = np.resize(a, (c, h, w)).reshape(-1)  # other channel counts: the RGB planes repeated
    return out
