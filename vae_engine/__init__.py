"""vae-engine: train, export and run variational autoencoders fast.

The package is laid out in the order data moves (ARCHITECTURE.md): core -> data -> model -> modeldir -> perf ->
training -> runtime -> export -> anomaly -> jobs -> serving -> cli. The public API is re-exported here; heavy
libraries (torch, ONNX Runtime, Numba, scikit-learn) are imported on first use.
"""

import importlib

from .core.config import VERSION as __version__
from .core.config import ModelConfig, TrainConfig
from .core.errors import DataError, ExportError, ModelDirError, OutputError, VaeEngineError
from .core.lazy import exports

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "VAE": "model.networks", "Engine": "runtime.engine", "VAEOutlierDetector": "anomaly.detector",
    "evaluate_model": "jobs.evaluate", "load_backend": "runtime.backends",
    "import_modules": "export.imported", "import_diffusers": "export.imported",
}

# public modules, imported on first use: `vae_engine.data`, `vae_engine.ray_jobs`
_MODULES = {"data": "data", "ray_jobs": "jobs.ray_jobs"}

_exports = exports(__name__, _LAZY)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    return _exports(name)


__all__ = [
    "__version__", "ModelConfig", "TrainConfig", "VAE", "Engine", "VAEOutlierDetector", "VaeEngineError",
    "DataError", "ModelDirError", "ExportError", "OutputError", "evaluate_model", "load_backend", "data",
    "ray_jobs", "import_modules", "import_diffusers",
]
