"""vae-engine: train, export and run variational autoencoders fast.

The package is laid out in the order data moves (ARCHITECTURE.md): core -> data -> model -> modeldir -> perf ->
training -> runtime -> export -> anomaly -> jobs -> serving -> cli. The public API is re-exported here; heavy
libraries (torch, ONNX Runtime, Numba, scikit-learn) are imported on first use.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .core.config import VERSION as __version__
from .core.config import ModelConfig, TrainConfig
from .core.errors import DataError, ExportError, ModelDirError, OutputError, VaeEngineError
from .core.lazy import exports

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "VAE": "model.networks", "Engine": "runtime.engine", "VAEOutlierDetector": "anomaly.detector",
    "evaluate_model": "jobs.evaluate", "load_backend": "runtime.backends",
}

# Module paths of the flat layout (vae_engine.engine, vae_engine.checkpoint, ...), kept importable for users'
# scripts: each name is the same module object as its new home, so patching one patches the other.
MOVED = {
    "errors": "core.errors", "config": "core.config", "atomic": "core.atomic", "hardware": "core.hardware",
    "rng": "core.rng", "timing": "perf.timing", "readers": "data.readers",
    "likelihoods": "model.likelihoods", "likelihoods.base": "model.likelihoods.base",
    "likelihoods.bernoulli": "model.likelihoods.bernoulli", "likelihoods.gaussian": "model.likelihoods.gaussian",
    "likelihoods.continuous_bernoulli": "model.likelihoods.continuous_bernoulli", "priors": "model.priors",
    "kernels": "model.kernels", "reference": "model.estimators", "checkpoint": "modeldir",
    "graphs": "modeldir.graphs", "peaks": "perf.peaks", "work": "perf.work", "train": "training.train",
    "distributed": "training.distributed", "plots": "training.plots", "backends": "runtime.backends",
    "engine": "runtime.engine", "tuning": "runtime.tuning", "bench": "runtime.bench", "quantize": "export.quantize",
    "detector": "anomaly.detector", "ray_jobs": "jobs.ray_jobs", "evaluate": "jobs.evaluate", "detect": "jobs.detect",
    "server": "serving.server", "oip": "serving.oip", "oip_grpc": "serving.oip_grpc", "ray_serve": "serving.ray_serve",
    "inspect": "cli.info", "progress": "cli.progress",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `vae_engine.<old name>` as the module at its new place (MOVED)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.partition(".")
        if head == __name__ and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module):  # already executed at its new place
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())  # before the path finder: old sub-module names resolve here too


_exports = exports(__name__, _LAZY)


def __getattr__(name: str):
    if name == "data" or name in MOVED:  # `vae_engine.data`, and the flat layout's names (`vae_engine.ray_jobs`)
        return importlib.import_module(f".{name}", __name__)
    return _exports(name)


__all__ = [
    "__version__", "ModelConfig", "TrainConfig", "VAE", "Engine", "VAEOutlierDetector", "VaeEngineError",
    "DataError", "ModelDirError", "ExportError", "OutputError", "evaluate_model", "load_backend", "data",
    "ray_jobs",
]
