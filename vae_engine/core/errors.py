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
