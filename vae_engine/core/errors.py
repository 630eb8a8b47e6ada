"""The project's own exceptions: everything a user can cause raises one of these."""

from __future__ import annotations

import errno
import os


class VaeEngineError(Exception):
    """A problem the user can fix (bad path, bad file, wrong shape); the CLI prints it as one line."""


class DataError(VaeEngineError):
    """A dataset file or input array is missing, corrupt or malformed."""


class ModelDirError(VaeEngineError):
    """A model directory is missing files or holds files that do not belong together."""


class ExportError(VaeEngineError):
    """ONNX export or its validation against PyTorch failed."""


class OutputError(VaeEngineError):
    """An output cannot be written: no space left, no permission, a read-only disk, a path of the wrong kind."""


class Interrupted(VaeEngineError):
    """The user stopped the work (Ctrl-C, SIGTERM); the message says what was kept. The CLI exits 130."""


# optional libraries -> the extra of vae-engine that installs them
EXTRAS = {"torch": "train", "onnxscript": "train", "matplotlib": "train", "fastapi": "serve", "uvicorn": "serve",
          "prometheus_client": "serve", "orjson": "serve", "grpc": "grpc", "openvino": "openvino",
          "ray": "distributed", "pyarrow": "distributed", "diffusers": "diffusers"}


class MissingDependency(VaeEngineError):
    """An optional library a command needs is not installed; the message names the extra that installs it."""


def missing_dependency(exc: ImportError, what: str = "this") -> MissingDependency | None:
    """The one-line error for an ImportError of an optional library (None for any other ImportError)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return MissingDependency(f"{what} needs {top}, which is not installed here: pip install "
                             f"'vae-engine[{EXTRAS[top]}]'")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for a one-line error: its first non-empty line, at most `limit` characters, or its
    class name when it has no message (libraries raise both kinds)."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return (line or type(exc).__name__)[:limit]


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_reason(exc: OSError) -> str:
    """A short, user-facing reason for an OSError: what happened and what to do."""
    if exc.errno in _NO_SPACE:
        return "no space left on the device (or a file size/quota limit); free some space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; check the file's permissions"
    if exc.errno == errno.EROFS:
        return "the file system is read-only; choose another location"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno == errno.EISDIR:
        return "is a directory, not a file"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    return exc.strerror or type(exc).__name__


def read_error(path: str | os.PathLike, exc: OSError, what: str = "file") -> DataError:
    """The DataError for an OSError met while reading `path`."""
    return DataError(f"{path}: cannot read the {what}: {os_error_reason(exc)}")


def write_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """The OutputError for an OSError met while writing `path`."""
    return OutputError(f"{path}: cannot write: {os_error_reason(exc)}")
