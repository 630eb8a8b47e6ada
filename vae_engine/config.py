"""Frozen dataclasses for every configuration the project writes into config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import VaeEngineError

IMAGE_SHAPE = (28, 28)  # (H, W) of every IDX dataset we read
INPUT_DIM = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]  # 784 pixels, the flat input of every model
LOGVAR_MIN, LOGVAR_MAX = -16.0, 10.0  # logvar is clamped here so exp(logvar) can never overflow/underflow
# decoder rows per call when scoring with K samples (bounds memory at ~50 MB of logits). Smaller calls run the
# GEMMs faster in isolation (784-500-500-50 decoder, 2 threads: ~204 GFLOP/s at 1024 rows, ~161 at 15000), but
# the full k=5000 evaluation took 555 s with 2048 rows against 500 s with 16384: per-call overhead wins.
SCORE_ROWS = 16384

ARCHS = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh", "elu", "softplus")
OBJECTIVES = ("elbo", "iwae")
BINARIZE = ("dynamic", "none")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a VAE from its weights."""

    arch: str = "mlp"  # "mlp" or "conv"
    latent_dim: int = 20  # size of z
    hidden: tuple[int, ...] = (400, 400)  # encoder hidden sizes; the decoder mirrors them
    activation: str = "relu"  # nonlinearity between hidden layers
    input_dim: int = INPUT_DIM  # flat pixels per image (28*28)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.arch not in ARCHS:
            raise VaeEngineError(f"unknown architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.activation not in ACTIVATIONS:
            raise VaeEngineError(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.latent_dim < 1:
            raise VaeEngineError(f"latent dim must be at least 1, got {self.latent_dim}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise VaeEngineError(f"hidden sizes must be positive integers, got {list(self.hidden)}")
        if self.input_dim != INPUT_DIM:
            raise VaeEngineError(f"input_dim must be {INPUT_DIM} (28x28 images), got {self.input_dim}")


@dataclass(frozen=True)
class TrainConfig:
    """How a model was (or will be) trained."""

    dataset: str = "mnist"  # bundled "mnist", a downloaded "fashion-mnist"/"kmnist", or "dir" for --data-dir
    data_dir: str | None = None  # folder holding the four IDX files, when not a named dataset
    binarize: str = "dynamic"  # "dynamic": Bernoulli re-sampling each use (Burda et al.); "none": grayscale
    epochs: int = 10  # passes over the training set
    batch_size: int = 100  # images per optimizer step
    lr: float = 1e-3  # Adam learning rate
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 0 over all epochs)
    objective: str = "elbo"  # "elbo" (analytic KL) or "iwae" (Burda et al. bound with k samples)
    k: int = 1  # importance samples per input for the IWAE objective
    kl_warmup_epochs: int = 0  # linearly anneal the KL weight from 0 to 1 over this many epochs (ELBO only)
    seed: int = 0  # seeds init, shuffling, binarization and eps
    threads: int | None = None  # torch intra-op threads (None: all cores)
    limit: int | None = None  # train on the first N training images only (for quick runs and tests)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.k >= 1, f"k must be at least 1, got {self.k}"),
            (self.kl_warmup_epochs >= 0, f"KL warm-up epochs must be >= 0, got {self.kl_warmup_epochs}"),
            (self.objective in OBJECTIVES, f"unknown objective {self.objective!r}: choose elbo or iwae"),
            (self.binarize in BINARIZE, f"unknown binarization {self.binarize!r}: choose dynamic or none"),
            (self.lr_schedule in LR_SCHEDULES, f"unknown lr schedule {self.lr_schedule!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VaeEngineError(message)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from a dict, ignoring keys a newer version may have added."""
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise VaeEngineError(f"config does not describe a {cls.__name__}: {exc}") from None


__all__ = ["ModelConfig", "TrainConfig", "to_dict", "from_dict"]
