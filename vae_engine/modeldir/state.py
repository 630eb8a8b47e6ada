"""Resuming a run: the training state (weights, Adam moments, epoch, the metrics rows so far) in one atomic
safetensors file, and metrics.jsonl, one row per finished epoch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import atomic
from ..core.errors import ModelDirError
from .layout import MAX_JSON_BYTES, METRICS, STATE
from .weights import check_tensors, load_tensors, save_tensors, weight_spec

if TYPE_CHECKING:
    import torch

    from ..model.networks import VAE


_MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's first and second moments, one of each per parameter


def save_state(model_dir: Path, model: VAE, optimizer: torch.optim.Optimizer, epoch: int,
               metrics: list[dict[str, Any]]) -> None:
    """Everything --resume needs in one atomic safetensors file: weights, Adam moments and step, epoch, and the
    metrics rows up to this epoch (so metrics.jsonl can always be rebuilt to match the checkpoint)."""
    import torch

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key in (*_MOMENTS, "step"):
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(state[key], dtype=torch.float32)
    save_tensors(model_dir / STATE, tensors, {"epoch": str(epoch), "metrics": json.dumps(metrics)})


def load_state(model_dir: Path, model: VAE, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    """Restore weights and optimizer from the resume state, every tensor checked against the model.

    Returns (finished epochs, metrics rows). The optimizer keeps its own hyperparameters: only tensors and
    numbers are taken from the file, never settings.
    """
    import torch

    path = model_dir / STATE
    tensors, metadata = load_tensors(path)
    params = list(model.parameters())
    expected = {f"model.{k}": spec for k, spec in weight_spec(model).items()}
    for index, p in enumerate(params):
        expected.update({f"optim.{index}.{m}": (tuple(p.shape), torch.float32) for m in _MOMENTS})
        expected[f"optim.{index}.step"] = ((), torch.float32)
    check_tensors(tensors, expected, path, "resume state tensors")
    try:
        epoch = int(metadata["epoch"])
    except (KeyError, ValueError):
        raise ModelDirError(f"{path}: resume state has no valid epoch number; start the run again") from None
    steps = {float(tensors[f"optim.{i}.step"]) for i in range(len(params))}
    for i in range(len(params)):
        if bool((tensors[f"optim.{i}.exp_avg_sq"] < 0).any()):
            raise ModelDirError(f"{path}: optim.{i}.exp_avg_sq has negative values; the file is corrupt")
    if len(steps) != 1 or not all(s >= 0 and s == int(s) for s in steps) or not 0 <= epoch <= 10**7:
        raise ModelDirError(f"{path}: inconsistent step counts {sorted(steps)[:3]} or epoch {epoch}; "
                            "the file is corrupt")
    metrics = _valid_rows(metadata.get("metrics"), epoch)
    if metrics is None:  # an older state file: take the metrics file's rows up to the checkpoint
        metrics = [r for r in read_metrics(model_dir) if r["epoch"] <= epoch]
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    opt = optimizer.state_dict()
    opt["state"] = {i: {"step": tensors[f"optim.{i}.step"].clone(), **{m: tensors[f"optim.{i}.{m}"].clone()
                                                                       for m in _MOMENTS}}
                    for i in range(len(params))}
    optimizer.load_state_dict(opt)
    return epoch, metrics


def _valid_rows(text: str | None, epoch: int) -> list[dict[str, Any]] | None:
    """The metrics rows stored in a state file, if they are a well-formed list for epochs 1..epoch."""
    if text is None:
        return None
    try:
        rows = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rows, list) or [r.get("epoch") if isinstance(r, dict) else None for r in rows] \
            != list(range(1, epoch + 1)):
        return None
    return rows


_METRIC_FIELDS = ("epoch", "train_loss", "test_nelbo", "seconds")


def read_metrics(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch metrics recorded so far (empty if none); malformed lines are skipped, never fatal."""
    path = Path(model_dir) / METRICS
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES).decode("utf-8", "replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                                         and math.isfinite(row[k]) for k in _METRIC_FIELDS):
            rows.append(row)
    return rows


def write_metrics(model_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl atomically."""
    atomic.write_text(model_dir / METRICS, "".join(json.dumps(row) + "\n" for row in rows))
