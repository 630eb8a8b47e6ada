"""A model folder's layout: its file names, finding the folder (the shipped model by default), reading our JSON
files safely, and the lock a writing process holds."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.errors import ModelDirError, VaeEngineError, first_line, os_error_reason

FORMAT = "vae-engine/1"
CONFIG = "config.json"  # model + training config, data, versions
WEIGHTS = "model.safetensors"  # inference weights only
PRIOR = "prior.safetensors"  # a VampPrior model's mixture (model/priors.py), written with the weights
STATE = "train_state.safetensors"  # weights + optimizer + epoch, everything --resume needs, in one atomic file
METRICS = "metrics.jsonl"  # one JSON line per epoch
EVALUATION = "evaluation.json"  # written by `vae-engine evaluate`
PLOTS = "plots"
EXPORT_REPORT = "export_report.json"  # written by `vae-engine export`
LOCK = ".vae-engine.lock"  # held (flock) by the process writing into the folder: train, export
INFERENCE_FILES = (CONFIG, WEIGHTS, PRIOR)  # what a model folder copied elsewhere carries (PRIOR where it has one)
MAX_JSON_BYTES = 16 << 20  # config.json, reports: anything larger is not ours


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The model directory to use: the one given, else $VAE_ENGINE_MODEL, else the shipped models/mnist-vae."""
    if model_dir is not None:
        return Path(model_dir)
    if os.environ.get("VAE_ENGINE_MODEL"):
        return Path(os.environ["VAE_ENGINE_MODEL"])
    package = Path(__file__).resolve().parents[1]  # vae_engine/
    for shipped in (package.parent / "models" / "mnist-vae",  # a clone or editable install
                    package / "shipped" / "mnist-vae"):  # `pip install .`
        if (shipped / CONFIG).is_file():
            return shipped
    raise ModelDirError("no model given and the shipped models/mnist-vae was not found; pass a model directory")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file of ours, with one clear ModelDirError for missing, unreadable, huge or invalid files."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing") from None
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read the {what}: {os_error_reason(exc)}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ModelDirError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MB, not a {what} of vae-engine")
    try:
        return json.loads(raw, parse_constant=lambda c: float(c))
    except (ValueError, RecursionError) as exc:
        raise ModelDirError(f"{path}: not valid JSON ({first_line(exc, 200)})") from None


def read_entries(path: Path, schema: str, field: str) -> list[dict[str, Any]]:
    """The keyed entries of one of our JSON stores ({"schema": schema, field: [{"key": {...}, ...}, ...]}: saved
    decisions, accuracies, GEMM peaks); a missing, unreadable, damaged or foreign file holds none."""
    try:
        doc = read_json(path, path.name) if path.is_file() else None
    except VaeEngineError:
        return []
    ok = isinstance(doc, dict) and doc.get("schema") == schema and isinstance(doc.get(field), list)
    return [d for d in doc[field] if isinstance(d, dict) and isinstance(d.get("key"), dict)] if ok else []


def put_entry(path: Path, schema: str, field: str, entry: dict[str, Any], keep: int) -> None:
    """Add an entry to such a store, replacing the one of the same key and keeping the newest `keep`, written
    atomically (its folder made when missing); an OSError or VaeEngineError when it cannot be written."""
    entries = [d for d in read_entries(path, schema, field) if d.get("key") != entry["key"]][-(keep - 1):]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, {"schema": schema, field: [*entries, entry]})


@contextlib.contextmanager
def lock(model_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on a model folder while writing into it; a second writer gets a clear error.

    An flock on `.vae-engine.lock`: the kernel drops it when the process dies, so a killed run never leaves
    the folder locked; the file is removed on release. After locking we check that the path still names the
    file we locked (a releasing writer may have just removed it), else lock again. The folder is created if
    needed.
    """
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: is a file; choose a folder for the model")
    atomic.make_parents(model_dir)
    path = model_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ModelDirError(f"{model_dir}: cannot write into it: {os_error_reason(exc)}") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): no protection, as before
            break
        except BlockingIOError:
            os.close(fd)
            raise ModelDirError(f"{model_dir}: another vae-engine process is writing into this folder (train or "
                                "export); wait for it to finish or choose another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file that its previous holder removed meanwhile: start over
    try:
        yield model_dir
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
