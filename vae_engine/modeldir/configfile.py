"""config.json: the model's and the training's configuration, the data it saw and the library versions, written
atomically and read back checked."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.config import ModelConfig, TrainConfig, from_dict, to_dict
from ..core.errors import ModelDirError, VaeEngineError
from .layout import CONFIG, FORMAT, read_json


def versions() -> dict[str, str | None]:
    """Versions of Python and the libraries a model directory depends on, read from the installed packages'
    metadata, never by importing them (importing torch to read its version cost a job seconds); None for a
    library that is not installed (torch in an inference-only install, openvino without its extra)."""
    from ..core.config import VERSION

    infos = _dist_infos()
    return {"vae_engine": VERSION, "python": platform.python_version(),
            **{name: installed_version(name, infos) for name in ("torch", "numpy", "onnx", "onnxruntime", "numba",
                                                          "openvino")}}


# distributions that install a library under another name (the `onnxruntime` module of onnxruntime-gpu)
ALIASES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")}


def _dist_infos() -> dict[str, str]:
    """Normalized distribution name -> version, from the `NAME-VERSION.dist-info` folders on sys.path (the first
    entry wins, as for imports): one directory listing per path entry, against importlib.metadata's full scan per
    name (~25 ms of every job's start-up on the 2-core machines)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            stem = name.removesuffix(".dist-info")
            if stem != name and stem.count("-") == 1:
                dist, version = stem.split("-")  # the name part holds no "-" (wheels write "_")
                found.setdefault(dist.lower().replace(".", "_"), version)
    return found


def installed_version(name: str, infos: dict[str, str] | None = None) -> str | None:
    """The installed version of a distribution (None when it is not installed), without importing it: from the
    dist-info folders' names (`_dist_infos`), else importlib.metadata (eggs, unusual layouts)."""
    infos = _dist_infos() if infos is None else infos
    for dist in ALIASES.get(name, (name,)):
        if dist.replace("-", "_") in infos:
            return infos[dist.replace("-", "_")]
    import importlib.util

    if importlib.util.find_spec(name) is None:  # not installed: no metadata scan (torch in an inference install)
        return None
    import importlib.metadata as md

    for dist in ALIASES.get(name, (name,)):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return None


def write_config(model_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data: dict[str, Any]) -> None:
    """Write config.json atomically."""
    atomic.write_json(model_dir / CONFIG, {
        "format": FORMAT, "model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": data,
        "versions": versions(),
    })


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a model directory, checked for the fields every reader needs."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: model directory not found" if not model_dir.exists()
                            else f"{model_dir}: is a file, not a model directory")
    path = model_dir / CONFIG
    if not path.exists():
        raise ModelDirError(f"{path}: missing; is {model_dir} a model directory made by `vae-engine train`?")
    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ModelDirError(f"{path}: has no 'model' object; it is not a vae-engine config")
    for section in ("train", "data", "versions"):
        if not isinstance(cfg.get(section, {}), dict):
            raise ModelDirError(f"{path}: '{section}' must be a JSON object, got {type(cfg[section]).__name__}")
    return cfg


def _section(model_dir: str | os.PathLike, cls: type, name: str) -> Any:
    try:
        return from_dict(cls, read_config(model_dir).get(name, {}))
    except ModelDirError:
        raise
    except VaeEngineError as exc:
        raise ModelDirError(f"{Path(model_dir) / CONFIG}: '{name}' section is invalid: {exc}") from None


def model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a model directory (types and sizes checked before anything is allocated)."""
    return _section(model_dir, ModelConfig, "model")


def train_config(model_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig stored in a model directory."""
    return _section(model_dir, TrainConfig, "train")
