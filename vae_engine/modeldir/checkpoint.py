"""The model directory: config.json, model.safetensors, the resume state, metrics.jsonl and plots/."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import atomic
from ..core.config import LOGVAR_MAX, LOGVAR_MIN, ModelConfig, TrainConfig, from_dict, to_dict
from ..core.errors import ModelDirError, VaeEngineError, os_error_reason

if TYPE_CHECKING:  # torch is imported where tensors are used, so `info` and `--help` start fast
    import torch

    from ..model.networks import VAE
    from ..model.priors import MixturePrior, NormalPrior

FORMAT = "vae-engine/1"
CONFIG = "config.json"  # model + training config, data, versions
WEIGHTS = "model.safetensors"  # inference weights only
PRIOR = "prior.safetensors"  # a VampPrior model's mixture (priors.py), written with the weights
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


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a model directory depends on (openvino: None when not installed; read
    from the package metadata, not imported)."""
    import importlib.metadata as md

    import numba
    import numpy
    import onnx
    import onnxruntime
    import torch

    from ..core.config import VERSION as __version__

    return {
        "vae_engine": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "numba": numba.__version__, "openvino": _installed_version(md, "openvino"),
    }


def _installed_version(md, name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def write_config(model_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data: dict[str, Any]) -> None:
    """Write config.json atomically."""
    atomic.write_json(model_dir / CONFIG, {
        "format": FORMAT, "model": to_dict(model_cfg), "train": to_dict(train_cfg), "data": data,
        "versions": versions(),
    })


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
        raise ModelDirError(f"{path}: not valid JSON ({str(exc)[:200]})") from None


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


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a clear error for missing, unreadable or corrupt files."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelDirError(f"{path}: missing; train a model first (`vae-engine train --out {path.parent}`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read it: {os_error_reason(exc)}") from None
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelDirError(f"{path}: corrupt safetensors file ({str(exc)[:200]})") from None


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], Any]],
                  path: Path, what: str) -> None:
    """Every loaded tensor must have exactly the expected names, shapes and dtypes, and finite values.

    A crafted file must never reach a kernel: fused Adam, for one, writes through its moments with the
    parameter's size, so a moment of the wrong shape is an out-of-bounds write.
    """
    import torch

    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        detail = (f"missing {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
                 (f"unexpected {extra[:3]}" if extra else "")
        raise ModelDirError(f"{path}: {what} do not match config.json ({detail})")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ModelDirError(f"{path}: {name} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
                                f"config.json needs {str(dtype).removeprefix('torch.')} {tuple(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelDirError(f"{path}: {name} holds NaN or Inf values; the file is corrupt or the run diverged")


def _weight_spec(model: VAE) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _load_weights(model: VAE, tensors: dict[str, torch.Tensor], path: Path) -> None:
    check_tensors(tensors, _weight_spec(model), path, "weights")
    model.load_state_dict(tensors, strict=True)


def load_model(model_dir: str | os.PathLike) -> VAE:
    """Rebuild the VAE from config.json and load model.safetensors into it (eval mode), every tensor checked."""
    from ..model.networks import VAE

    model_dir = Path(model_dir)
    model = VAE(model_config(model_dir))
    _load_weights(model, _load_tensors(model_dir / WEIGHTS)[0], model_dir / WEIGHTS)
    return model.eval()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialize in memory, then write atomically (safetensors' own file writer leaves temps of its own)."""
    from safetensors.torch import save

    atomic.write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_weights(model_dir: Path, model: VAE) -> None:
    """Write model.safetensors atomically (weights only), and a VampPrior model's prior.safetensors after it."""
    _save_tensors(model_dir / WEIGHTS, model.state_dict(), {"format": "pt"})
    save_prior(model_dir, model)


def save_prior(model_dir: Path, model: VAE) -> None:
    """Write prior.safetensors (the mixture of a VampPrior model, computed in fp32) atomically; nothing else has one."""
    import torch

    if model.cfg.prior == "vamp":
        with torch.no_grad():
            mu, logvar = model.prior.components()
        _save_tensors(model_dir / PRIOR, {"mu": mu.float(), "logvar": logvar.float()}, {"format": "pt"})


def load_prior(model_dir: str | os.PathLike, cfg: ModelConfig) -> NormalPrior | MixturePrior:
    """The prior a model folder's config names; a VampPrior's mixture from prior.safetensors, every value checked
    (shape (C, L) from config.json, finite, log-variances in the encoder's bounds)."""
    import torch

    from ..model.priors import MixturePrior, NormalPrior

    if cfg.prior != "vamp":
        return NormalPrior(cfg.latent_dim)
    path = Path(model_dir) / PRIOR
    tensors, _ = _load_tensors(path)
    shape = (cfg.pseudo_inputs, cfg.latent_dim)
    check_tensors(tensors, {"mu": (shape, torch.float32), "logvar": (shape, torch.float32)}, path, "prior tensors")
    logvar = tensors["logvar"].numpy()
    if logvar.min() < LOGVAR_MIN or logvar.max() > LOGVAR_MAX:
        raise ModelDirError(f"{path}: logvar lies outside [{LOGVAR_MIN:g}, {LOGVAR_MAX:g}]; the file was not "
                            "written by train")
    return MixturePrior(tensors["mu"].numpy(), logvar)


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of model.safetensors; exported graphs record it to tie them to their weights."""
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read it: {os_error_reason(exc)}") from None
    return digest.hexdigest()


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
    _save_tensors(model_dir / STATE, tensors, {"epoch": str(epoch), "metrics": json.dumps(metrics)})


def load_state(model_dir: Path, model: VAE, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, Any]]]:
    """Restore weights and optimizer from the resume state, every tensor checked against the model.

    Returns (finished epochs, metrics rows). The optimizer keeps its own hyperparameters: only tensors and
    numbers are taken from the file, never settings.
    """
    import torch

    path = model_dir / STATE
    tensors, metadata = _load_tensors(path)
    params = list(model.parameters())
    expected = {f"model.{k}": spec for k, spec in _weight_spec(model).items()}
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
