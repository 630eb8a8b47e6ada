"""vae-engine: train, export and run variational autoencoders fast."""

__version__ = "0.1.0"

from .config import ModelConfig, TrainConfig  # noqa: E402
from .errors import DataError, ExportError, ModelDirError, VaeEngineError  # noqa: E402
from .model import VAE  # noqa: E402

__all__ = [
    "__version__", "ModelConfig", "TrainConfig", "VAE", "VaeEngineError", "DataError", "ModelDirError",
    "ExportError",
]
