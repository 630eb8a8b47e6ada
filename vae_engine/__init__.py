"""vae-engine: train, export and run variational autoencoders fast."""

__version__ = "0.1.0"

from .config import ModelConfig, TrainConfig  # noqa: E402
from .errors import DataError, ExportError, ModelDirError, OutputError, VaeEngineError  # noqa: E402

# heavy (torch, ONNX Runtime, Numba, scikit-learn): imported on first use
_LAZY = {"VAE": "model", "Engine": "engine", "VAEOutlierDetector": "detector"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "ModelConfig", "TrainConfig", "VAE", "Engine", "VAEOutlierDetector", "VaeEngineError",
    "DataError", "ModelDirError",
    "ExportError", "OutputError",
]
