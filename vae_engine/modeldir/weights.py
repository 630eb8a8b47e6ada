"""The weights (model.safetensors) and a VampPrior's mixture (prior.safetensors): written atomically, loaded with
every tensor checked against the model config.json describes (names, shapes, dtypes, finite values). Never a
pickle."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import atomic
from ..core.config import LOGVAR_MAX, LOGVAR_MIN, ModelConfig
from ..core.errors import ModelDirError, first_line, os_error_reason
from .configfile import model_config
from .layout import PRIOR, WEIGHTS

if TYPE_CHECKING:  # torch is imported where tensors are used, so `info` and `--help` start fast
    import torch

    from ..model.engine_priors import MixturePrior, NoPrior, NormalPrior
    from ..model.networks import VAE


def load_tensors(path: Path, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, as torch tensors ("pt") or NumPy arrays ("numpy": no torch
    imported); a clear error for missing, unreadable or corrupt files."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelDirError(f"{path}: missing; train a model first (`vae-engine train --out {path.parent}`)")
    try:
        with safe_open(str(path), framework=framework) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read it: {os_error_reason(exc)}") from None
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise ModelDirError(f"{path}: corrupt safetensors file ({first_line(exc, 200)})") from None


def check_tensors(tensors: dict[str, Any], expected: dict[str, tuple[tuple[int, ...], Any]],
                  path: Path, what: str) -> None:
    """Every loaded tensor (torch or NumPy) must have exactly the expected names, shapes and dtypes (torch or
    NumPy dtypes, compared by name), and finite values.

    A crafted file must never reach a kernel: fused Adam, for one, writes through its moments with the
    parameter's size, so a moment of the wrong shape is an out-of-bounds write.
    """
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        detail = (f"missing {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
                 (f"unexpected {extra[:3]}" if extra else "")
        raise ModelDirError(f"{path}: {what} do not match config.json ({detail})")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or _dtype_name(t.dtype) != _dtype_name(dtype):
            raise ModelDirError(f"{path}: {name} is {_dtype_name(t.dtype)} {tuple(t.shape)}, "
                                f"config.json needs {_dtype_name(dtype)} {tuple(shape)}")
        if not _finite(t):
            raise ModelDirError(f"{path}: {name} holds NaN or Inf values; the file is corrupt or the run diverged")


def _dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32, np.float32, np.dtype('float32') and 'float32' alike."""
    if isinstance(dtype, type):  # a NumPy scalar type
        return dtype.__name__
    return str(getattr(dtype, "name", None) or dtype).removeprefix("torch.")


def _finite(t: Any) -> bool:
    """No NaN or Inf in a floating tensor (torch or NumPy); other dtypes are always finite."""
    if hasattr(t, "is_floating_point"):  # torch
        import torch

        return not t.is_floating_point() or bool(torch.isfinite(t).all())
    import numpy as np

    return not np.issubdtype(t.dtype, np.floating) or bool(np.isfinite(t).all())


def weight_spec(model: VAE) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def load_weights(model: VAE, tensors: dict[str, torch.Tensor], path: Path) -> None:
    check_tensors(tensors, weight_spec(model), path, "weights")
    model.load_state_dict(tensors, strict=True)


def load_model(model_dir: str | os.PathLike) -> VAE:
    """Rebuild the VAE from config.json and load model.safetensors into it (eval mode), every tensor checked. An
    imported model's source module (diffusers' AutoencoderKL) is rebuilt from its own config and its weights,
    under its own names, checked the same way, then wrapped in the engine's conventions (`model/imported.py`)."""
    model_dir = Path(model_dir)
    cfg = model_config(model_dir)
    if not cfg.trained:
        from ..model import imported

        source = imported.source_module(cfg)
        load_weights(source, load_tensors(model_dir / WEIGHTS)[0], model_dir / WEIGHTS)
        return imported.wrap_diffusers(cfg, source)
    from ..model.networks import VAE

    model = VAE(cfg)
    load_weights(model, load_tensors(model_dir / WEIGHTS)[0], model_dir / WEIGHTS)
    return model.eval()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialize in memory, then write atomically (safetensors' own file writer leaves temps of its own)."""
    from safetensors.torch import save

    atomic.write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_weights(model_dir: Path, model: VAE) -> None:
    """Write model.safetensors atomically (weights only), and a VampPrior model's prior.safetensors after it."""
    save_tensors(model_dir / WEIGHTS, model.state_dict(), {"format": "pt"})
    save_prior(model_dir, model)


def save_prior(model_dir: Path, model: VAE) -> None:
    """Write prior.safetensors (the mixture of a VampPrior model, computed in fp32) atomically; nothing else has one."""
    import torch

    from ..model.engine_priors import kind

    if kind(model.cfg).mixture:
        with torch.no_grad():
            mu, logvar = model.prior.components()
        save_tensors(model_dir / PRIOR, {"mu": mu.float(), "logvar": logvar.float()}, {"format": "pt"})


def load_prior(model_dir: str | os.PathLike, cfg: ModelConfig) -> NormalPrior | MixturePrior | NoPrior:
    """The prior a model folder's config names; a VampPrior's mixture from prior.safetensors, every value checked
    (shape (C, L) from config.json, finite, log-variances in the encoder's bounds), read as NumPy arrays: the
    engine's prior needs no torch."""
    from ..model.engine_priors import MixturePrior, NoPrior, NormalPrior, kind

    if not kind(cfg).mixture:
        return (NoPrior if cfg.prior == "none" else NormalPrior)(cfg.latent_dim)
    path = Path(model_dir) / PRIOR
    tensors, _ = load_tensors(path, "numpy")
    shape = (cfg.pseudo_inputs, cfg.latent_dim)
    check_tensors(tensors, {"mu": (shape, "float32"), "logvar": (shape, "float32")}, path, "prior tensors")
    logvar = tensors["logvar"]
    if logvar.min() < LOGVAR_MIN or logvar.max() > LOGVAR_MAX:
        raise ModelDirError(f"{path}: logvar lies outside [{LOGVAR_MIN:g}, {LOGVAR_MAX:g}]; the file was not "
                            "written by train")
    return MixturePrior(tensors["mu"], logvar)


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of model.safetensors; exported graphs record it to tie them to their weights."""
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ModelDirError(f"{path}: missing")
    return file_sha256(path)


_HASHES: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process for each (path, size, modification time): a job asks for
    the weights' and graphs' hashes several times (its decision's key, the cache folder, accuracy entries)."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _HASHES:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            _HASHES[key] = digest.hexdigest()
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read it: {os_error_reason(exc)}") from None
    return _HASHES[key]
