"""Atomic file writes: a temp file in the same folder, then one rename, so readers never see half a file.

Temps are named `.NAME.vae-tmp-PID-XXXX`, so they are recognisable: a process killed with SIGKILL cannot remove
its own, and the next write into the same folder removes every temp whose process is gone. Out of space, a
read-only disk or missing permissions become an `OutputError` with the temp removed, and folders that a failed
write created are removed again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError, write_error

TMP_TAG = ".vae-tmp-"
_TMP_RE = re.compile(re.escape(TMP_TAG) + r"(\d+)-")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # only writing causes these
_cleaned: set[Path] = set()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a number we cannot judge): keep its temp
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove temps (files or folders) left in `folder` by processes that no longer run; return what went."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_RE.search(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _clean_once(folder: Path) -> None:
    key = folder.resolve()
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale(folder)


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; return the folders it created (deepest last), so a failure can remove them again."""
    created = []
    for parent in [*reversed(folder.parents), folder]:
        if parent.is_dir():
            continue
        try:
            parent.mkdir()
        except FileExistsError:
            if not parent.is_dir():
                raise OutputError(f"{parent}: exists and is not a folder; choose another output path") from None
            continue
        except OSError as exc:
            remove_empty(created)
            raise write_error(parent, exc) from None
        created.append(parent)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) that are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Refuse an output before any work is done: a file where a folder is needed (or the reverse), or a place
    that cannot be written (missing permission, read-only file system)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise OutputError(f"{path}: is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'}"
                          " path")
    target = path if folder and path.is_dir() else path.parent
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{path}: {existing} is a file, not a folder; choose another output path")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        read_only = False
    if read_only:
        raise OutputError(f"{path}: {existing} is on a read-only file system; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: no permission to write into {existing}; choose another output path")


def tmp_name(path: Path) -> str:
    """A recognisable temp name beside `path`: .NAME.vae-tmp-PID-XXXX."""
    return f".{path.name}{TMP_TAG}{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed over `path`, on any error removed."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    created = make_parents(path.parent)
    _clean_once(path.parent)
    try:
        # keep the real suffix last so libraries that dispatch on it (np.save, savefig) do the right thing
        fd, tmp = tempfile.mkstemp(prefix=tmp_name(path), suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        remove_empty(created)
        raise write_error(path, exc) from None
    tmp = Path(tmp)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in _WRITE_ERRNOS:
                raise write_error(path, exc) from None
            raise
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give outputs the usual permissions
            _fsync(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(path, exc) from None
    except BaseException:  # includes KeyboardInterrupt: an interrupted write leaves nothing behind
        tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise


def _fsync(path: Path) -> None:
    """Flush a file to disk before it replaces the old one, so a crash never leaves an empty target."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(folder: Path, files: dict[str, bytes], scratch: Path) -> None:
    """Write several files into `folder` as nearly at once as a file system allows: every one written into the
    scratch folder (`temp_dir`, inside `folder`) first, so a full disk fails there with nothing replaced, then
    each renamed into place."""
    staged = Path(scratch) / "staged"
    staged.mkdir()
    for name, payload in files.items():
        write_bytes(staged / name, payload)
    for name in files:
        os.replace(staged / name, Path(folder) / name)


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder `.NAME.vae-tmp-PID-XXXX` inside `parent`, removed on exit (stale ones on the next run)."""
    parent = Path(parent)
    created = make_parents(parent)
    _clean_once(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=tmp_name(parent / name), dir=parent))
    except OSError as exc:
        remove_empty(created)
        raise write_error(parent / name, exc) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(staging: Path, target: Path) -> None:
    """Put a complete folder `staging` in place of `target` (whose old copy, if any, is removed)."""
    old = None
    if target.exists():
        old = target.with_name(f"{tmp_name(target)}old")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write text (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def save_npy(path: str | os.PathLike, array) -> None:
    """Atomically write a small array as .npy (whole, from memory)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write pretty-printed JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class ArrayWriter:
    """Rows of a float32 array file (.npy, or a one-tensor .safetensors) written with plain positioned writes (no
    memory map) after its header: both formats put a header before the raw little-endian rows, and the shape is
    known up front.

    The whole file is reserved up front (posix_fallocate), so a full disk is found before any work, and a
    write error is an OSError, never the SIGBUS that a memory-mapped output dies of when the disk fills.
    """

    def __init__(self, file, shape: tuple[int, ...], header: bytes):
        import numpy as np

        self.fd, self.shape, self.rows = file.fileno(), shape, 0
        self.row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
        file.write(header)
        file.flush()
        self.offset = file.tell()
        total = self.offset + self.row_bytes * shape[0]
        try:
            os.posix_fallocate(self.fd, 0, total)
        except AttributeError:  # no posix_fallocate on this platform: size the file, plain writes still fail cleanly
            os.ftruncate(self.fd, total)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it: plain writes only
                raise
            os.ftruncate(self.fd, total)

    def write_at(self, start: int, rows) -> None:
        """Write rows start..start+len(rows)-1."""
        import numpy as np

        rows = np.ascontiguousarray(rows, dtype="<f4")
        if rows.shape[1:] != tuple(self.shape[1:]) or not 0 <= start <= self.shape[0] - len(rows):
            raise ValueError(f"rows {start}+{rows.shape} do not fit an output of shape {self.shape}")
        view, offset = memoryview(rows).cast("B"), self.offset + start * self.row_bytes
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        self.rows += len(rows)

    def write(self, rows) -> None:
        """Append rows after those written so far."""
        self.write_at(self.rows, rows)


ARRAY_SUFFIXES = (".npy", ".safetensors")  # the array files a job writes (`array_writer`)


def _header(suffix: str, shape: tuple[int, ...], name: str) -> bytes:
    """The bytes before the rows: NumPy's .npy header, or safetensors' (its length, then JSON naming one F32
    tensor `name` of `shape`, padded with spaces to 8 bytes as the format recommends)."""
    import io
    import math

    import numpy as np

    if suffix == ".npy":
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
        return buf.getvalue()
    size = 4 * math.prod(shape)
    meta = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]},
                       "__metadata__": {"format": "np"}}, separators=(",", ":")).encode()
    meta += b" " * (-len(meta) % 8)
    return len(meta).to_bytes(8, "little") + meta


@contextlib.contextmanager
def array_writer(path: str | os.PathLike, shape: tuple[int, ...], name: str = "data") -> Iterator[ArrayWriter]:
    """Atomically write a float32 array of `shape` as .npy or .safetensors (by the path's suffix; the tensor named
    `name`), rows block by block; an incomplete output is an error."""
    suffix = Path(path).suffix
    if suffix not in ARRAY_SUFFIXES:
        raise OutputError(f"{path}: an array output must end in {' or '.join(ARRAY_SUFFIXES)}")
    shape = tuple(int(s) for s in shape)
    with atomic_path(path, suffix) as tmp, open(tmp, "r+b") as f:
        writer = ArrayWriter(f, shape, _header(suffix, shape, name))
        yield writer
        if writer.rows != writer.shape[0]:
            raise RuntimeError(f"{path}: {writer.rows} of {writer.shape[0]} rows written")
