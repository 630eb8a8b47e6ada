"""The strict IDX reader, the bundled MNIST copy and binarization."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from vae_engine import data
from vae_engine.core.errors import DataError

from .conftest import idx_bytes, write_idx_dataset


def test_round_trip_raw_and_gz(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "a").write_bytes(idx_bytes(arr, 2051))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr, 2051)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a", 2051), arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz", 2051), arr)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "size mismatch"),
        (lambda b: b"\x01" + b[1:], "bad magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad magic"),  # unknown type code
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:3] + b"\x01" + b[4:], "bad magic number 2049, expected 2051"),  # labels magic for images
        (lambda b: b"", "truncated"),
    ],
)
def test_corrupt_files_are_named(tmp_path, mutate, message):
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8), 2051)
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(mutate(raw))
    with pytest.raises(DataError, match=message) as err:
        data.read_idx(path, 2051)
    assert str(path) in str(err.value)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8), 2051))[:-8])
    with pytest.raises(DataError, match="gzip"):
        data.read_idx(path)


def test_split_checks_counts_and_labels(tmp_path):
    folder = write_idx_dataset(tmp_path / "d", n_train=10, n_test=5, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8), 2049))
    with pytest.raises(DataError, match="4 labels for 5 images"):
        data.load_split(folder, "test")
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 10, np.uint8), 2049))
    with pytest.raises(DataError, match="labels must be 0-9"):
        data.load_split(folder, "test")
    with pytest.raises(DataError, match="missing train-images"):
        data.load_split(tmp_path, "train")
    with pytest.raises(DataError, match="not found"):
        data.load_split(tmp_path / "nope", "train")


def test_checksum_mismatch_detected(tmp_path):
    folder = write_idx_dataset(tmp_path / "d", n_train=10, n_test=5, gz=False)
    (folder / "SHA256SUMS").write_text("0" * 64 + "  t10k-images-idx3-ubyte\n")
    with pytest.raises(DataError, match="SHA-256"):
        data.load_split(folder, "test")


def test_bundled_mnist_matches_sha256sums():
    folder = data.bundled_dir()
    sums = dict(line.split()[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert len(sums) == 4
    for name, digest in sums.items():
        assert hashlib.sha256(gzip.decompress((folder / f"{name}.gz").read_bytes())).hexdigest() == digest
    images, labels = data.load_split(folder, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    # label counts from the dataset's README
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_named_dataset_without_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_ENGINE_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="--download"):
        data.load_dataset("kmnist")
    with pytest.raises(DataError, match="unknown dataset"):
        data.load_dataset("cifar")




@pytest.mark.parametrize("shape", [(1, 256), (1, 28, 28), (16, 256), (17, 256), (64, 784)])
def test_uint8_intensities_are_one_quotient_on_both_paths(shape):
    """uint8 -> intensity / 255: the Numba pass for small inputs and NumPy's for large ones give NumPy's float32
    quotient bit for bit, for every byte value, on contiguous and strided inputs."""
    a = np.resize(np.arange(256, dtype=np.uint8), shape)
    for x in (a, np.asfortranarray(a), a[:, ::-1]):
        got = data.inputs.to_float(x)
        want = x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [1, 784, data.inputs.SPAN_KERNEL_MAX, data.inputs.SPAN_KERNEL_MAX + 1, 50_000])
def test_span_of_the_input_rule_equals_numpy(n):
    """Both forms of the input rule's one pass (Numba for small arrays, NumPy's reductions for large ones): the
    same min, max and finiteness, with a NaN, +Inf or -Inf anywhere, and on strided views."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    for a in (x, x[::2], x.reshape(1, -1)):
        assert data.inputs.span(a) == (float(a.min()), float(a.max()), True)
    for bad in (np.nan, np.inf, -np.inf):
        for at in (0, n // 2, n - 1):
            y = x.copy()
            y[at] = bad
            assert data.inputs.span(y)[2] is False


@pytest.mark.parametrize("header", [True, False])
def test_csv_fast_reader_equals_the_row_reader(tmp_path, header):
    """Well-formed CSVs go through NumPy's C reader; the row-by-row reader (kept for exact errors) is its twin."""
    from vae_engine.data import readers

    x = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
    path = tmp_path / "t.csv"
    lines = ([",".join(f"c{j}" for j in range(7))] if header else []) + [",".join(repr(float(v)) for v in row)
                                                                        for row in x]
    path.write_text("\n\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\n")  # a blank line, as users have
    for columns in (None, ["c5", "c1"] if header else ["5", "1"]):
        fast, rows = readers._read_csv(path, columns), readers._read_csv_rows(path, columns)
        assert fast.dtype == np.float32 and fast.flags.c_contiguous
        np.testing.assert_array_equal(fast, rows)
    np.testing.assert_array_equal(readers._read_csv(path, None), x)
    path.write_text("a,b\n1,2\n3,x\n")  # not numeric: the row reader's exact error
    with pytest.raises(DataError, match=r"column 'b' is not numeric \(row 3"):
        readers._read_csv(path, None)
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataError, match="row 3 has 1 fields"):
        readers._read_csv(path, None)


def test_a_jobs_npy_input_is_streamed_not_loaded(tmp_path):
    """A job's .npy input is memory-mapped and converted chunk by chunk: opening a 64 MB float64 file and reading
    one chunk allocates a small fraction of it (the job's memory is bounded by its batch, not by the file)."""
    import tracemalloc

    from vae_engine.core.config import ModelConfig
    from vae_engine.jobs import batch

    cfg = ModelConfig()
    path = tmp_path / "big.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(10_000, cfg.input_dim))[:] = 0.5
    tracemalloc.start()
    source = batch.open_items(path, cfg)
    chunk = source.read(0, 100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert source.n == 10_000 and chunk.shape == (100, cfg.input_dim)
    assert peak < 8 * 1024 * 1024, peak
