"""Frozen dataclasses for every configuration the project writes into config.json."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VaeEngineError

VERSION = "0.1.0"  # the package's version (vae_engine.__version__), recorded in config.json and graphs
IMAGE_SHAPE = (28, 28)  # (H, W) of every IDX dataset we read
INPUT_DIM = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]  # 784 pixels, the flat input of every model
LOG_2PI = math.log(2.0 * math.pi)  # the Gaussian normalizer, for every log-density in torch, NumPy and Numba
LOGVAR_MIN, LOGVAR_MAX = -16.0, 10.0  # logvar is clamped here so exp(logvar) can never overflow/underflow
# decoder rows per call when scoring with K samples (bounds memory at ~50 MB of logits). Smaller calls run the
# GEMMs faster in isolation (784-500-500-50 decoder, 2 threads: ~204 GFLOP/s at 1024 rows, ~161 at 15000), but
# the full k=5000 evaluation took 555 s with 2048 rows against 500 s with 16384: per-call overhead wins.
SCORE_ROWS = 16384
# ...and the graph backends (CPU) run any call of more rows than this in chunks of it, each written into one
# preallocated output, so each chunk's activations stay in cache: the 16,384-row decoder call went 194 -> 128-133
# ms (112 -> 164-171 GFLOP/s) on the 2-core AVX2 EPYC (ONNX Runtime, 2 threads, spinning off), OpenVINO 175-187 ->
# 154-158 ms. 512 rows ran as fast for ONNX Runtime, slower for OpenVINO; 2048 and 4096 slower for both.
CHUNK_ROWS = 1024
# ...of items this many values hold in all (1024 MNIST images): larger items run in proportionally fewer rows per
# call (`ModelConfig.chunk_rows`), so a call's activations are bounded whatever an item's size (a 256x256 RGB image
# through the SD-VAE encoder is ~0.3 GB of activations: 4 rows a call, not 1024)
CHUNK_VALUES = CHUNK_ROWS * 784
MAX_SCORE_K = 100_000_000  # importance samples per input when scoring (streamed over K, so memory stays bounded)

SEED_MAX = 2**32 - 1  # seeds are 0..2^32-1: every generator (torch, NumPy, the counter streams) takes them
# Limits checked before anything is allocated: a config.json is user input, and latent_dim 1e9 must be an
# error line, not an out-of-memory kill.
MAX_LATENT, MAX_WIDTH, MAX_LAYERS, MAX_PARAMS = 1 << 20, 16384, 16, 200_000_000
MAX_INPUT = 1 << 22  # values per item (e.g. 3x1024x1024 images are under it)
# The likelihoods (defined in likelihoods/) and what their decoder graph returns: (output name, values per
# feature). Listed here so the graphs' spec (and `info`) need not import Numba; the classes read it from here.
# "none": an imported autoencoder that declares no p(x|z); its decoder returns E[x|z] (encode/decode only).
DECODER_OUTPUTS = {"bernoulli": ("logits", 1), "continuous-bernoulli": ("logits", 1), "gaussian": ("params", 2),
                   "none": ("mean", 1)}
LIKELIHOODS = tuple(DECODER_OUTPUTS)
TRAINED_LIKELIHOODS = LIKELIHOODS[:3]  # what `train` fits
MAX_THREADS, MAX_BATCH, MAX_TRAIN_K, MAX_EPOCHS = 1024, 1 << 18, 10_000, 1_000_000  # batch: ~1 GB of pixels

RULES = ("nll", "nll-complexity", "reconstruction", "latent")  # the detector's scoring rules (anomaly/detector.py)
# the benchmark's choice (bench/detect_bench.py, README "Side by side"): as accurate as "nll" there, and one
# encoder and one decoder pass per item instead of k decoder passes (fast enough to serve)
DEFAULT_RULE = "reconstruction"
ARCHS = ("mlp", "conv", "resnet")  # resnet: residual conv blocks around the conv arch's strided layers
# models brought in from outside (`vae-engine import`, export/imported.py): diffusers' AutoencoderKL, which torch
# rebuilds from its own config; or a user's modules, which run on their exported graphs only
IMPORTED_ARCHS = ("autoencoder-kl", "modules")
ACTIVATIONS = ("relu", "tanh", "elu", "softplus")
# dreg: the IWAE bound with doubly reparameterized gradients for the encoder (Tucker et al. 2018)
OBJECTIVES = ("elbo", "iwae", "dreg")
# p(z): N(0, I), the VampPrior mixture over learned pseudo-inputs (model/priors.py), or none (an imported model
# that declares no prior: no sampling, no likelihood scores)
PRIORS = ("normal", "vamp", "none")
TRAINED_PRIORS = PRIORS[:2]  # what `train` fits
MAX_PSEUDO_INPUTS = 10_000
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast where the CPU has native bf16, else fp32
BINARIZE = ("dynamic", "none")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ImportSpec:
    """How an imported model's networks meet the engine (`ModelConfig.imported`, export/imported.py): the engine's
    items are in [0, 1] (uint8 / 255) and its latents are the model's scaled latents, so the graphs map
    `input_range` in, (mean - shift_factor) * scaling_factor out of the encoder (Stable Diffusion's convention:
    latents a diffusion model trains on), the inverse into the decoder, and a decoder's `output_range` back to
    [0, 1]."""

    source: str = "modules"  # "diffusers" (rebuilt from `config` by diffusers) or "modules" (graphs only)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    input_range: tuple[float, float] | None = None  # what the networks take items in; None: the engine's units
    output_range: tuple[float, float] | None = None  # what a decoder without likelihood returns; None: as is
    config: dict[str, Any] | None = None  # the source's own config (diffusers: AutoencoderKL's config.json)
    origin: str = ""  # where it was imported from (a folder, a hub id), for the record

    def __post_init__(self) -> None:
        if self.source not in IMPORT_SOURCES:
            raise VaeEngineError(f"unknown import source {self.source!r}: choose one of {', '.join(IMPORT_SOURCES)}")
        for name in ("scaling_factor", "shift_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise VaeEngineError(f"{name} must be a finite number, got {value!r}")
        if self.scaling_factor <= 0:
            raise VaeEngineError(f"scaling_factor must be positive, got {self.scaling_factor!r}")
        for name in ("input_range", "output_range"):
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            if not ok or value[0] >= value[1]:
                raise VaeEngineError(f"{name} must be [low, high] with low < high, got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        if self.config is not None and not isinstance(self.config, dict):
            raise VaeEngineError(f"the source's config must be a JSON object, got {type(self.config).__name__}")
        if self.source == "diffusers" and self.config is None:
            raise VaeEngineError("a model imported from diffusers needs its AutoencoderKL config")


IMPORT_SOURCES = ("diffusers", "modules")


def no_scores(no_likelihood: bool, no_prior: bool) -> str | None:
    """The one message for what a model without a likelihood or a prior cannot do (None when it has both): the
    config's `cannot_score`, and the likelihood and prior objects that stand for "none"."""
    missing = [what for what, none in (("likelihood p(x|z)", no_likelihood), ("prior p(z)", no_prior)) if none]
    if not missing:
        return None
    return (f"this model declares no {' and no '.join(missing)} (an imported autoencoder): encode, decode and "
            "reconstruct run on it; scores, evaluation" + (" and sampling" if no_prior else "")
            + " need a model that declares them")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a VAE from its weights."""

    arch: str = "mlp"  # "mlp", "conv" or "resnet"
    latent_dim: int = 20  # size of z
    hidden: tuple[int, ...] = (400, 400)  # encoder hidden sizes; the decoder mirrors them
    activation: str = "relu"  # nonlinearity between hidden layers
    input_shape: tuple[int, ...] = (INPUT_DIM,)  # one item: (D,) features or (C, H, W) image; old folders: (784,)
    likelihood: str = "bernoulli"  # p(x|z): bernoulli, continuous-bernoulli or gaussian (see likelihoods/)
    standardize: bool = False  # inputs standardized per feature inside the model (mean/std stored as buffers)
    prior: str = "normal"  # p(z): "normal" N(0, I) or "vamp" (Tomczak & Welling 2018); folders before it: normal
    pseudo_inputs: int = 500  # VampPrior: mixture components, one learned pseudo-input each (unused for normal)
    latent_shape: tuple[int, ...] | None = None  # one item's latent, e.g. (4, 32, 32); None: (latent_dim,)
    # an imported model's declaration (export/imported.py): its source's own config, the scaling conventions
    imported: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.latent_shape is None:
            object.__setattr__(self, "latent_shape", (self.latent_dim,))
        for name in ("hidden", "input_shape", "latent_shape"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise VaeEngineError(f"{name} must be a list of sizes, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.arch != "mlp" and self.input_shape == (INPUT_DIM,):  # conv folders from before input_shape
            object.__setattr__(self, "input_shape", (1, *IMAGE_SHAPE))
        if len(self.input_shape) not in (1, 3):
            raise VaeEngineError(f"input_shape must be (D,) or (C, H, W), got {list(self.input_shape)}")
        if self.imported is not None:
            # checked now (a config.json is user input), and kept in its JSON form
            object.__setattr__(self, "imported", to_dict(from_dict(ImportSpec, self.imported)))
        for name, value, lo, hi in (("latent dim", self.latent_dim, 1, MAX_LATENT),
                                    *(("input size", s, 1, MAX_INPUT) for s in self.input_shape),
                                    *(("hidden size", h, 1, MAX_WIDTH) for h in self.hidden)):
            check_int(name, value, lo, hi)
        if not 1 <= len(self.latent_shape) <= 4 or not all(type(s) is int and s >= 1 for s in self.latent_shape) \
                or math.prod(self.latent_shape) != self.latent_dim:
            raise VaeEngineError(f"latent_shape must be 1 to 4 positive sizes holding latent_dim = {self.latent_dim} "
                                 f"values, got {list(self.latent_shape)}")
        if self.input_dim > MAX_INPUT:
            raise VaeEngineError(f"an item of shape {list(self.input_shape)} has {self.input_dim:,} values, over the "
                                 f"limit of {MAX_INPUT:,}")
        if not isinstance(self.standardize, bool):
            raise VaeEngineError(f"standardize must be true or false, got {self.standardize!r}")
        check_int("pseudo inputs", self.pseudo_inputs, 1, MAX_PSEUDO_INPUTS)
        for name, value in (("arch", self.arch), ("activation", self.activation), ("likelihood", self.likelihood),
                            ("prior", self.prior)):
            if not isinstance(value, str):
                raise VaeEngineError(f"{name} must be a string, got {value!r}")
        if self.arch not in ARCHS + IMPORTED_ARCHS:
            raise VaeEngineError(f"unknown architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if (self.arch in IMPORTED_ARCHS) != (self.imported is not None):
            raise VaeEngineError(f"architecture {self.arch!r} and the 'imported' declaration do not go together")
        if self.activation not in ACTIVATIONS:
            raise VaeEngineError(f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if not self.hidden or len(self.hidden) > MAX_LAYERS:
            raise VaeEngineError(f"hidden must list 1 to {MAX_LAYERS} layer sizes, got {list(self.hidden)}")
        if self.likelihood not in (*LIKELIHOODS, "auto"):  # auto: chosen from the data when training starts
            raise VaeEngineError(f"unknown likelihood {self.likelihood!r}: choose auto or one of "
                                 f"{', '.join(LIKELIHOODS)}")
        if self.prior not in PRIORS:
            raise VaeEngineError(f"unknown prior {self.prior!r}: choose one of {', '.join(PRIORS)}")
        if self.arch in IMPORTED_ARCHS:
            return  # its networks are its own: the layer checks below are the trainer's architectures'
        if self.likelihood == "none" or self.prior == "none":
            raise VaeEngineError(f"likelihood and prior 'none' are for imported models; the {self.arch} architecture "
                                 f"trains with one of {', '.join(TRAINED_LIKELIHOODS)} and {', '.join(TRAINED_PRIORS)}")
        if len(self.latent_shape) != 1:
            raise VaeEngineError(f"the {self.arch} architecture has flat latents, got latent_shape "
                                 f"{list(self.latent_shape)}")
        if self.arch != "mlp" and (len(self.input_shape) != 3 or min(self.input_shape[1:]) < 4):
            raise VaeEngineError(f"the {self.arch} architecture needs (C, H, W) images of at least 4x4, got "
                                 f"{list(self.input_shape)}; use --arch mlp")
        sizes = (self.input_dim, *self.hidden)
        params = 2 * sum(a * b for a, b in zip(sizes, sizes[1:], strict=False)) + 3 * self.hidden[-1] * self.latent_dim
        params += self.input_dim * self.hidden[0]  # the decoder's extra parameters per feature (gaussian)
        params += self.input_dim * self.pseudo_inputs * (self.prior == "vamp")
        if params > MAX_PARAMS:
            raise VaeEngineError(f"a model of hidden {list(self.hidden)} and latent dim {self.latent_dim} has about "
                                 f"{params:,} weights, over the limit of {MAX_PARAMS:,}; choose smaller layers")

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether items of `shape` fit the model: its own shape, flattened to D, a grey image without its channel
        axis, or for 784-value models a 28x28 image."""
        return tuple(shape) in self.item_shapes

    @functools.cached_property  # asked on every call of the input rule (a batch-1 request): a set lookup
    def item_shapes(self) -> frozenset[tuple[int, ...]]:
        """The item shapes `accepts` takes."""
        shapes = {self.input_shape, (self.input_dim,)}
        if self.input_dim == INPUT_DIM:
            shapes |= {IMAGE_SHAPE, (1, *IMAGE_SHAPE)}
        if len(self.input_shape) == 3 and self.input_shape[0] == 1:
            shapes.add(self.input_shape[1:])
        return frozenset(shapes)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) when items are images (flat 784-value models are 28x28 MNIST images), else None."""
        if len(self.input_shape) == 3:
            return tuple(self.input_shape)
        return (1, *IMAGE_SHAPE) if self.input_shape == (INPUT_DIM,) else None

    @functools.cached_property  # asked by every score call (a batch-1 request): computed once
    def cannot_score(self) -> str | None:
        """Why this model cannot be scored (likelihoods, evaluation, sampling from its prior), or None where it
        can: an imported autoencoder that declares no likelihood or no prior (`no_scores`)."""
        return no_scores(self.likelihood == "none", self.prior == "none")

    @property
    def import_spec(self) -> ImportSpec | None:
        """An imported model's declaration (None for a model this project trained)."""
        return None if self.imported is None else from_dict(ImportSpec, self.imported)

    @property
    def chunk_rows(self) -> int:
        """Rows per runtime call (and per job chunk) for items of this size: CHUNK_ROWS for MNIST-sized items,
        proportionally fewer for larger ones, at least 1."""
        return max(1, min(CHUNK_ROWS, CHUNK_VALUES // self.input_dim))

    @property
    def trained(self) -> bool:
        """Made by this project's trainer (its networks rebuilt by model/networks.py), not imported."""
        return self.arch in ARCHS

    @property
    def input_dim(self) -> int:
        """Values per item, flattened: what the graphs take (the encoder reshapes for conv)."""
        return math.prod(self.input_shape)


@dataclass(frozen=True)
class TrainConfig:
    """How a model was (or will be) trained."""

    dataset: str = "mnist"  # bundled "mnist", a downloaded "fashion-mnist"/"kmnist", or "dir" for --data-dir
    data_dir: str | None = None  # folder holding the four IDX files, when not a named dataset
    data: str | None = None  # the user's own data: .npy/.npz/.csv/.parquet/IDX file or image folder (absolute)
    test_data: str | None = None  # its test split in a file of its own; else a seeded val_fraction split of data
    val_fraction: float = 0.1  # share of `data` held out for testing when there is no test_data
    columns: tuple[str, ...] | None = None  # .csv/.parquet: the columns to use (names or indices)
    resize: tuple[int, int] | None = None  # image folders: resize every image to (H, W)
    binarize: str = "dynamic"  # "dynamic": Bernoulli re-sampling each use (Burda et al.); "none": grayscale
    epochs: int = 10  # passes over the training set
    batch_size: int = 100  # images per optimizer step
    lr: float = 1e-3  # Adam learning rate
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 0 over all epochs)
    objective: str = "elbo"  # "elbo" (analytic KL), "iwae" (Burda et al. bound with k samples), "dreg" (IWAE, DReG)
    k: int = 1  # importance samples per input for the IWAE objective
    kl_warmup_epochs: int = 0  # linearly anneal the KL weight from 0 to 1 over this many epochs (ELBO only)
    seed: int = 0  # seeds init, shuffling, binarization and eps
    threads: int | None = None  # torch intra-op threads (None: all cores)
    limit: int | None = None  # train on the first N training images only (for quick runs and tests)
    precision: str = "fp32"  # "fp32" or "bf16" autocast (loss, log-sum-exp, optimizer in fp32); runs before it: fp32
    nll_every: int = 0  # epochs between IWAE NLL checks (k=1000, first 1,000 test items) in metrics; 0: none

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("epochs", self.epochs, 1, MAX_EPOCHS),
                                    ("batch size", self.batch_size, 1, MAX_BATCH),
                                    ("k", self.k, 1, MAX_TRAIN_K), ("seed", self.seed, 0, SEED_MAX),
                                    ("KL warm-up epochs", self.kl_warmup_epochs, 0, MAX_EPOCHS),
                                    ("NLL check interval", self.nll_every, 0, MAX_EPOCHS)):
            check_int(name, value, lo, hi)
        for name, value in (("threads", self.threads), ("limit", self.limit)):
            if value is not None:
                check_int(name, value, 1, MAX_THREADS if name == "threads" else None)
        for name, value in (("dataset", self.dataset), ("binarize", self.binarize), ("objective", self.objective),
                            ("lr_schedule", self.lr_schedule), ("precision", self.precision),
                            ("data_dir", self.data_dir), ("data", self.data),
                            ("test_data", self.test_data)):
            if not isinstance(value, str) and not (name in ("data_dir", "data", "test_data") and value is None):
                raise VaeEngineError(f"{name} must be a string, got {value!r}")
        for name in ("columns", "resize"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or not value:
                    raise VaeEngineError(f"{name} must be a non-empty list, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        if self.resize is not None and (len(self.resize) != 2 or not all(isinstance(v, int) and 0 < v <= 4096
                                                                           for v in self.resize)):
            raise VaeEngineError(f"resize must be (H, W) with sizes 1..4096, got {list(self.resize)}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 < self.val_fraction < 1.0:
            raise VaeEngineError(f"val fraction must be a number between 0 and 1, got {self.val_fraction!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise VaeEngineError(f"learning rate must be a number, got {self.lr!r}")
        checks = [
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive finite number, got {self.lr}"),
            (self.k * self.batch_size <= MAX_BATCH, f"k x batch size must be at most {MAX_BATCH:,}, got "
                                                    f"{self.k * self.batch_size:,}"),
            (self.objective in OBJECTIVES, f"unknown objective {self.objective!r}: choose {', '.join(OBJECTIVES)}"),
            (self.precision in TRAIN_PRECISIONS, f"unknown training precision {self.precision!r}: choose "
                                                 f"{', '.join(TRAIN_PRECISIONS)}"),
            (self.binarize in BINARIZE, f"unknown binarization {self.binarize!r}: choose dynamic or none"),
            (self.lr_schedule in LR_SCHEDULES, f"unknown lr schedule {self.lr_schedule!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VaeEngineError(message)


DEFAULT_BUDGET = 0.01  # nats: the largest change of the mean NLL a faster path may cost (--max-nll-change)
# a model without a likelihood (an imported autoencoder) has no nats: its faster paths may change its
# reconstructions (items in [0, 1]) by at most one 8-bit grey level on average, by the same rule
RECONSTRUCTION_BUDGET = 1 / 255
CONFIDENCE_SE = 2.0  # a path is within a budget when |mean NLL change| + this many standard errors of it is


def within_budget(change: float, se: float, budget: float) -> bool:
    """The one accuracy rule (`--precision auto`, `export --quantize int8`): a measured mean NLL change, with its
    standard error, keeps within `budget` nats by CONFIDENCE_SE standard errors."""
    return abs(change) + CONFIDENCE_SE * se <= budget


def cache_dir() -> Path:
    """This user's cache folder for vae-engine: $VAE_ENGINE_CACHE, else $XDG_CACHE_HOME/vae-engine, else
    ~/.cache/vae-engine (downloaded datasets; `--precision auto` decisions for model folders that are read-only)."""
    if os.environ.get("VAE_ENGINE_CACHE"):
        return Path(os.environ["VAE_ENGINE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae-engine"


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """`value` if it is an int in [lo, hi]; else a VaeEngineError naming the field and the range."""
    if type(value) is not int:  # the common case skips the (slow) ABC check
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


__all__ = ["ImportSpec", "ModelConfig", "TrainConfig", "check_int", "to_dict", "from_dict"]
