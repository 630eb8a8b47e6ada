"""Frozen dataclasses for every configuration the project writes into config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
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
MAX_SCORE_K = 100_000_000  # importance samples per input when scoring (streamed over K, so memory stays bounded)

SEED_MAX = 2**32 - 1  # seeds are 0..2^32-1: every generator (torch, NumPy, the counter streams) takes them
# Limits checked before anything is allocated: a config.json is user input, and latent_dim 1e9 must be an
# error line, not an out-of-memory kill.
MAX_LATENT, MAX_WIDTH, MAX_LAYERS, MAX_PARAMS = 4096, 16384, 16, 200_000_000
MAX_THREADS, MAX_BATCH, MAX_TRAIN_K, MAX_EPOCHS = 1024, 1 << 18, 10_000, 1_000_000  # batch: ~1 GB of pixels

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
        if not isinstance(self.hidden, (list, tuple)):
            raise VaeEngineError(f"hidden must be a list of layer sizes, got {self.hidden!r}")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for name, value, lo, hi in (("latent dim", self.latent_dim, 1, MAX_LATENT),
                                    ("input_dim", self.input_dim, 1, None),
                                    *(("hidden size", h, 1, MAX_WIDTH) for h in self.hidden)):
            check_int(name, value, lo, hi)
        for name, value in (("arch", self.arch), ("activation", self.activation)):
            if not isinstance(value, str):
                raise VaeEngineError(f"{name} must be a string, got {value!r}")
        if self.arch not in ARCHS:
            raise VaeEngineError(f"unknown architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.activation not in ACTIVATIONS:
            raise VaeEngineError(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if not self.hidden or len(self.hidden) > MAX_LAYERS:
            raise VaeEngineError(f"hidden must list 1 to {MAX_LAYERS} layer sizes, got {list(self.hidden)}")
        if self.input_dim != INPUT_DIM:
            raise VaeEngineError(f"input_dim must be {INPUT_DIM} (28x28 images), got {self.input_dim}")
        sizes = (self.input_dim, *self.hidden)
        params = 2 * sum(a * b for a, b in zip(sizes, sizes[1:], strict=False)) + 3 * self.hidden[-1] * self.latent_dim
        if params > MAX_PARAMS:
            raise VaeEngineError(f"a model of hidden {list(self.hidden)} and latent dim {self.latent_dim} has about "
                                 f"{params:,} weights, over the limit of {MAX_PARAMS:,}; choose smaller layers")


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
        for name, value, lo, hi in (("epochs", self.epochs, 1, MAX_EPOCHS),
                                    ("batch size", self.batch_size, 1, MAX_BATCH),
                                    ("k", self.k, 1, MAX_TRAIN_K), ("seed", self.seed, 0, SEED_MAX),
                                    ("KL warm-up epochs", self.kl_warmup_epochs, 0, MAX_EPOCHS)):
            check_int(name, value, lo, hi)
        for name, value in (("threads", self.threads), ("limit", self.limit)):
            if value is not None:
                check_int(name, value, 1, MAX_THREADS if name == "threads" else None)
        for name, value in (("dataset", self.dataset), ("binarize", self.binarize), ("objective", self.objective),
                            ("lr_schedule", self.lr_schedule), ("data_dir", self.data_dir)):
            if not isinstance(value, str) and not (name == "data_dir" and value is None):
                raise VaeEngineError(f"{name} must be a string, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise VaeEngineError(f"learning rate must be a number, got {self.lr!r}")
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive finite number, got {self.lr}"),
            (self.k * self.batch_size <= MAX_BATCH, f"k x batch size must be at most {MAX_BATCH:,}, got "
                                                    f"{self.k * self.batch_size:,}"),
            (self.objective in OBJECTIVES, f"unknown objective {self.objective!r}: choose elbo or iwae"),
            (self.binarize in BINARIZE, f"unknown binarization {self.binarize!r}: choose dynamic or none"),
            (self.lr_schedule in LR_SCHEDULES, f"unknown lr schedule {self.lr_schedule!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VaeEngineError(message)


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """`value` if it is an int in [lo, hi]; else a VaeEngineError naming the field and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise VaeEngineError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi:,}" if hi is not None else f"at least {lo}"
        raise VaeEngineError(f"{name} must be {bound}, got {value:,}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from a dict, ignoring keys a newer version may have added."""
    if not isinstance(data, dict):
        raise VaeEngineError(f"config must be a JSON object describing a {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise VaeEngineError(f"config does not describe a {cls.__name__}: {exc}") from None


__all__ = ["ModelConfig", "TrainConfig", "check_int", "to_dict", "from_dict"]
