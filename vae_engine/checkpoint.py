"""The model directory: config.json, model.safetensors, the resume state, metrics.jsonl and plots/."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import atomic
from .config import ModelConfig, TrainConfig, from_dict, to_dict
from .errors import ModelDirError
from .model import VAE

FORMAT = "vae-engine/1"
CONFIG = "config.json"  # model + training config, data, versions
WEIGHTS = "model.safetensors"  # inference weights only
STATE = "train_state.safetensors"  # weights + optimizer + epoch, everything --resume needs, in one atomic file
METRICS = "metrics.jsonl"  # one JSON line per epoch
EVALUATION = "evaluation.json"  # written by `vae-engine evaluate`
PLOTS = "plots"


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The model directory to use: the one given, else $VAE_ENGINE_MODEL, else the shipped models/mnist-vae."""
    if model_dir is not None:
        return Path(model_dir)
    if os.environ.get("VAE_ENGINE_MODEL"):
        return Path(os.environ["VAE_ENGINE_MODEL"])
    for shipped in (Path(__file__).resolve().parent.parent / "models" / "mnist-vae",  # a clone or editable install
                    Path(__file__).resolve().parent / "shipped" / "mnist-vae"):  # `pip install .`
        if (shipped / CONFIG).is_file():
            return shipped
    raise ModelDirError("no model given and the shipped models/mnist-vae was not found; pass a model directory")


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a model directory depends on."""
    import numba
    import numpy
    import onnx
    import onnxruntime

    from . import __version__

    return {
        "vae_engine": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "numba": numba.__version__,
    }


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
        raise ModelDirError(f"{model_dir}: model directory not found")
    path = model_dir / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing; is {model_dir} a model directory made by `vae-engine train`?") from None
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ModelDirError(f"{path}: has no 'model' section")
    return cfg


def model_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a model directory."""
    return from_dict(ModelConfig, read_config(model_dir)["model"])


def train_config(model_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig stored in a model directory."""
    return from_dict(TrainConfig, read_config(model_dir).get("train", {}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; train a model first (`vae-engine train --out {path.parent}`)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: corrupt safetensors file ({exc})") from None


def load_model(model_dir: str | os.PathLike) -> VAE:
    """Rebuild the VAE from config.json and load model.safetensors into it (eval mode)."""
    model_dir = Path(model_dir)
    model = VAE(model_config(model_dir))
    _load_weights(model, _load_tensors(model_dir / WEIGHTS), model_dir / WEIGHTS)
    return model.eval()


def _load_weights(model: VAE, tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelDirError(f"{path}: weights do not match config.json ({first})") from None


def save_weights(model_dir: Path, model: VAE) -> None:
    """Write model.safetensors atomically (weights only)."""
    with atomic.atomic_path(model_dir / WEIGHTS) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"format": "pt"})


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of model.safetensors; exported graphs record it to tie them to their weights."""
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_state(model_dir: Path, model: VAE, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Everything --resume needs in one atomic safetensors file: weights, optimizer moments, epoch."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
    metadata = {"epoch": str(epoch), "param_groups": json.dumps(opt["param_groups"])}
    with atomic.atomic_path(model_dir / STATE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state(model_dir: Path, model: VAE, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights and optimizer from the resume state; return the number of finished epochs."""
    path = model_dir / STATE
    tensors = _load_tensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    _load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        return int(metadata["epoch"])
    except (KeyError, ValueError) as exc:
        raise ModelDirError(f"{path}: resume state is incomplete ({exc})") from None


def read_metrics(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch metrics recorded so far (empty if none)."""
    path = Path(model_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(model_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl atomically."""
    atomic.write_text(model_dir / METRICS, "".join(json.dumps(row) + "\n" for row in rows))
