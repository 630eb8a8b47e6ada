"""Batch jobs: stream inputs in chunks through the engine and write outputs atomically.

Inputs: the model's items, (N, *item_shape) or flattened (N, D), uint8 0..255 or float: .npy (memory-mapped, so
larger than RAM is fine), .npz, .csv, .parquet, IDX/IDX.gz files, one PNG/JPEG image or a folder of them, of the
model's size. Outputs: .npy written in order with plain writes into a temp
file beside the target (its space reserved first) and renamed when complete, or a PNG grid for image outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import data
from ..core import atomic, rng
from ..core.config import IMAGE_SHAPE, ModelConfig
from ..core.errors import DataError, OutputError, VaeEngineError
from ..data import readers
from ..model import likelihoods
from ..runtime.engine import Engine

MAX_PNG_IMAGES = 4096  # a PNG grid beyond this is unreadable; write .npy instead


@dataclass
class Source:
    """A sized, chunkable input: `read(i, j)` returns rows i..j-1 as float32 (b, features), validated."""

    name: str
    n: int
    features: int
    read: Callable[[int, int], np.ndarray]

    def chunks(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for i in range(0, self.n, batch_size):
            yield i, self.read(i, min(self.n, i + batch_size))


def open_items(path: str | Path, cfg: ModelConfig, fit: bool = False) -> Source:
    """The model's input items from .npy (memory-mapped), .npz, .csv, .parquet, IDX(.gz), one PNG/JPEG image or a
    folder of them.

    Items must have the model's shape (or be flattened to its D values); images of another size are scaled and
    centre-cropped to it with `fit`. Each chunk passes the one input rule (`data.model_input`) with the file's
    name and row in any error.
    """
    path = Path(path)
    unit = likelihoods.get(cfg.likelihood).unit_interval
    if path.is_dir():
        return _images(path, readers.image_files(path), cfg, unit, fit)
    if not path.is_file():
        raise DataError(f"{path}: input not found")
    suffix = path.suffix.lower()
    if suffix in readers.IMAGE_SUFFIXES:
        return _images(path, [path], cfg, unit, fit)
    # a .npy is memory-mapped and converted chunk by chunk (memory bounded by the batch, whatever the file's
    # size); the other formats are read whole (readers.read, which converts to float32 at once)
    arr = readers.load_npy(path) if suffix == ".npy" else readers.read(path)[0]
    if len(arr) == 0:
        raise DataError(f"{path}: the input holds no items")
    data.check_fits(arr.shape[1:], cfg, str(path))
    return Source(str(path), len(arr), cfg.input_dim, lambda i, j: data.model_input(arr[i:j], unit, str(path), i))


def open_latents(path: str | Path, shape: tuple[int, ...]) -> Source:
    """A latent source: .npy (memory-mapped) or .safetensors (what encode writes), (N, *shape) or (N, L) float,
    each chunk by the input rule's `latents` (shape and dtype checked here first, so a wrong file fails before any
    work)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input not found")
    arr = readers.read_safetensors(path) if path.suffix == ".safetensors" else readers.load_npy(path)
    if len(arr) == 0:
        raise DataError(f"{path}: the input holds no latents")
    data.latents(arr[:1], shape, str(path))  # the rule's shape and dtype error, naming the file

    def read(i: int, j: int) -> np.ndarray:
        return data.latents(arr[i:j], shape, f"{path} rows {i}..{j - 1}")

    return Source(str(path), len(arr), math.prod(shape), read)


def _images(source: Path, files: list[Path], cfg: ModelConfig, unit: bool, fit: bool = False) -> Source:
    """PNG/JPEG files (a folder's, or one image; `source`, the folder or the file, names them in errors), decoded
    chunk by chunk; each must have the model's size."""
    shape = tuple(cfg.input_shape) if len(cfg.input_shape) == 3 else (1, *IMAGE_SHAPE)
    if math.prod(shape) != cfg.input_dim:
        raise DataError(f"{source}: this model takes items of shape {tuple(cfg.input_shape)}, not images")

    def read(i: int, j: int) -> np.ndarray:
        out = np.stack([readers.read_image(f, expect=shape, fit=fit) for f in files[i:j]])
        if out.shape[1:] != shape:
            raise DataError(f"{source}: images must have {shape[0]} channel(s) for this model")
        return data.model_input(out, unit, str(source), i)

    return Source(str(source), len(files), cfg.input_dim, read)


def check_output(path: str | Path, images: bool) -> None:
    """Refuse an output path before any work: wrong suffix, a folder, or a parent that cannot be written. Image
    outputs may also be a new (or empty) folder: a path without a suffix, one PNG file per item."""
    path = Path(path)
    if images and path.suffix == "":
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise OutputError(f"{path}: exists and is not an empty folder; a folder of PNG files is written new, "
                              "choose another path")
        atomic.check_writable(path, folder=True)
        return
    allowed = (*atomic.ARRAY_SUFFIXES, ".png") if images else atomic.ARRAY_SUFFIXES
    if path.suffix not in allowed:
        raise OutputError(f"{path}: output must end in {' or '.join(allowed)}"
                          + (", or be a folder (no suffix) for one PNG file per item" if images else ""))
    atomic.check_writable(path)


def stream(source: Source, fn: Callable[[int, np.ndarray], np.ndarray], out_path: str | Path, item_shape: tuple,
        batch_size: int, progress: Callable[[int], None] | None = None,
        image_shape: tuple[int, ...] | None = None, name: str = "data") -> Path:
    """Stream `source` through `fn(start, chunk) -> (b, *item_shape)` into out_path (.npy, .safetensors with one
    tensor `name`, or when outputs are images of `image_shape` (C, H, W): a .png grid, or a folder (a path without
    suffix) of one PNG file per item, 000000.png on, staged and renamed into place when complete)."""
    out_path = Path(out_path)
    check_output(out_path, image_shape is not None)
    if batch_size < 1:
        raise VaeEngineError(f"batch size must be at least 1, got {batch_size}")
    if out_path.suffix == "":
        from ..data.grids import save_png

        width = max(6, len(str(source.n - 1)))
        with atomic.temp_dir(out_path.parent, out_path.name) as scratch:
            staged = scratch / "images"
            staged.mkdir()
            for i, chunk in source.chunks(batch_size):
                for j, item in enumerate(fn(i, chunk)):
                    save_png(staged / f"{i + j:0{width}d}.png", item, image_shape)
                if progress:
                    progress(len(chunk))
            atomic.replace_dir(staged, out_path)
        return out_path
    if out_path.suffix == ".png" and source.n > MAX_PNG_IMAGES:
        raise VaeEngineError(f"{source.n} images are too many for a PNG grid (max {MAX_PNG_IMAGES}); write .npy")
    if out_path.suffix == ".png":
        from ..data.grids import save_grid_png

        grid = np.concatenate([fn(i, chunk) for i, chunk in source.chunks(batch_size)])
        save_grid_png(out_path, grid, image_shape)
        if progress:
            progress(source.n)
        return out_path
    with atomic.array_writer(out_path, (source.n, *item_shape), name) as out:  # reserves the space before any work
        for i, chunk in source.chunks(batch_size):
            out.write(fn(i, chunk).reshape(len(chunk), *item_shape))  # flat latents -> the model's latent shape
            if progress:
                progress(len(chunk))
    return out_path


def counter(n: int) -> Source:
    """A source of n item indices (for `sample`, which has no input)."""
    return Source("sample", n, 0, lambda i, j: np.empty((j - i, 0), np.float32))


# ---- the jobs: each maps a chunk (start, rows) to output rows ----


def encode_fn(engine: Engine, sample: bool, with_logvar: bool, seed: int):
    """Posterior mean (or a posterior sample) per input; with_logvar: (N, 2, D) with [:, 0] z and [:, 1] logvar."""
    def fn(start: int, x: np.ndarray) -> np.ndarray:
        mu, logvar = engine.encode(x)
        z = engine.sample_posterior(mu, logvar, 1, seed, start)[:, 0] if sample else mu
        return np.stack([z, logvar], axis=1) if with_logvar else z
    return fn


def decode_fn(engine: Engine, sample: bool, seed: int, binary: bool = False):
    """E[x|z] per latent (pixel probabilities for Bernoulli), or with `sample` one draw x ~ p(x|z) from the
    item's counter streams (every likelihood). `binary` (the older --binary) is `sample` for Bernoulli models."""
    if binary and engine.likelihood.name != "bernoulli":
        raise VaeEngineError(f"--binary draws Bernoulli pixels; this model's likelihood is {engine.likelihood.name}: "
                             "use --sample to draw from it")

    def fn(start: int, z: np.ndarray) -> np.ndarray:
        return engine.decode_sample(z, seed, start) if sample or binary else engine.decode(z)
    return fn


def sample_fn(engine: Engine, seed: int):
    if engine.cfg.prior == "none":
        engine.check_scores()  # the one error, before the job starts
    return lambda start, rows: engine.sample(len(rows), seed, start)


def reconstruct_fn(engine: Engine):
    return lambda start, x: engine.reconstruct(x)


def score_fn(engine: Engine, k: int, seed: int, binarize: bool, rule: str = "nll"):
    """-ELBO (k=1) or the IWAE negative log-likelihood (k>1) per input, in nats; or, with another `rule`, minus
    that anomaly-detection rule's normality score (`rules.RULES`; higher = more unusual either way)."""
    if rule != "nll":
        return _rule_fn(engine, rule, k, seed)
    engine.check_scores()

    def fn(start: int, x: np.ndarray) -> np.ndarray:
        return score_items(engine, x, k, rng.Streams.contiguous(seed, start, len(x)), binarize).astype(np.float32)
    return fn


def score_items(engine: Engine, x: np.ndarray, k: int, streams: rng.Streams, binarize: bool) -> np.ndarray:
    """The score job on a batch whose items read `streams` (one run per request when the server merges several):
    -ELBO (k=1) or the IWAE NLL (k>1) per item, float64 nats; Bernoulli models' inputs binarized first."""
    x = scored_items(engine, x, streams, binarize)
    return -engine.elbo(x, streams=streams) if k == 1 else -engine.log_likelihood(x, k, streams=streams)


def scored_items(engine: Engine, x: np.ndarray, streams: rng.Streams, binarize: bool) -> np.ndarray:
    """The items a score sees: Bernoulli models' [0, 1] inputs binarized from the items' own streams."""
    return streams.binarize(x) if binarize and engine.likelihood.binarized else x


def _rule_fn(engine: Engine, rule: str, k: int, seed: int):
    """A detector scoring rule as a job: its statistics from the model folder's detector.json (the reconstruction
    rule needs none); inputs are not binarized (the rules are deterministic)."""
    from ..anomaly import rules as detector

    detector.check_rule(rule)
    doc = detector.read_detector(engine.model_dir) if rule != "reconstruction" else None
    stats = (np.asarray(doc["latent_mean"]), np.asarray(doc["latent_cov"]),
             tuple(np.asarray(r, np.float64) for r in doc["quantize_range"])) if doc else (None, None, None)

    def fn(start: int, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(engine.prepare_items(x))
        whole = lambda a: [(0, len(a), a)]  # noqa: E731 - the job already hands over one chunk
        return -detector.rule_scores(engine, x, rule, k, seed, *stats, whole).astype(np.float32)
    return fn


@dataclass(frozen=True)
class Job:
    """A job: its chunk function made from an engine and the job's parameters, the shape of one output row, what
    it reads ("items", "latents" or "count"), and the name of what it writes (a .safetensors output's tensor)."""

    make: Callable[[Engine, dict, int], Callable[[int, np.ndarray], np.ndarray]]  # (engine, params, seed) -> fn
    row_shape: Callable[[ModelConfig, dict], tuple[int, ...]]
    reads: str = "items"
    writes: str = "items"


# a job: its chunk function above and its line here; the CLI command is a docstring and one `run_job` call
JOBS = {
    "encode": Job(lambda e, p, seed: encode_fn(e, p.get("sample", False), p.get("with_logvar", False), seed),
                  lambda cfg, p: (2, *cfg.latent_shape) if p.get("with_logvar") else cfg.latent_shape,
                  writes="latents"),
    "decode": Job(lambda e, p, seed: decode_fn(e, p.get("sample", False), seed, p.get("binary", False)),
                  lambda cfg, p: (cfg.input_dim,), "latents"),
    "sample": Job(lambda e, p, seed: sample_fn(e, seed), lambda cfg, p: (cfg.input_dim,), "count"),
    "reconstruct": Job(lambda e, p, seed: reconstruct_fn(e), lambda cfg, p: (cfg.input_dim,)),
    "score": Job(lambda e, p, seed: score_fn(e, p.get("k", 1), seed, p.get("binarize", True), p.get("rule", "nll")),
                 lambda cfg, p: (), writes="scores"),
}
JOB_NAMES = tuple(JOBS)


def _job(job: str) -> Job:
    if job not in JOBS:
        raise VaeEngineError(f"unknown job {job!r}: choose one of {', '.join(JOB_NAMES)}")
    return JOBS[job]


def make_job_fn(job: str, engine: Engine, params: dict) -> Callable[[int, np.ndarray], np.ndarray]:
    """The chunk function of a named job with its parameters (the single-process and Ray paths share it)."""
    return _job(job).make(engine, params, params.get("seed", 0))


def output_name(job: str) -> str:
    """The name of what a job writes: a .safetensors output's tensor ("latents", "items", "scores")."""
    return _job(job).writes


def item_shape(job: str, cfg: ModelConfig, params: dict) -> tuple[int, ...]:
    """The shape of one output row of a job: latents, a score, or an item flattened to D values."""
    return _job(job).row_shape(cfg, params)


def open_input(job: str, path: str | Path | None, cfg: ModelConfig, n: int = 0, fit: bool = False) -> Source:
    """The input of a job: latents for decode, a counter for sample, the model's items otherwise (images of
    another size scaled and centre-cropped with `fit`)."""
    reads = _job(job).reads
    if reads == "count":
        return counter(n)
    return open_latents(path, cfg.latent_shape) if reads == "latents" else open_items(path, cfg, fit)
