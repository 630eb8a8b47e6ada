"""Batch jobs on Ray Data: the same jobs as `jobs`, as a pipeline of shard readers and engine actors.

Shards of the input are read inside the cluster; `map_batches` runs an actor class that loads the model (one
ONNX Runtime session per actor, intra-op threads = the actor's CPUs); the driver writes the output atomically in
input order. Every random draw is keyed by the global item index, so results equal the single-process job.
Needs the optional extra: pip install "vae-engine[distributed]".
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import data
from ..core import atomic, hardware
from ..core.errors import VaeEngineError, write_error
from ..data import readers
from . import batch as jobs

JOBS = ("encode", "decode", "reconstruct", "score")
SHARD_ROWS = 8192  # rows per input shard read by one task


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise VaeEngineError('Ray is not installed: pip install "vae-engine[distributed]"') from None
    return ray


def _open(job: str, path: str, cfg, fit: bool = False) -> jobs.Source:
    """The input source of a job (Parquet: numeric columns, or one list column of D values per row); images of
    another size scaled and centre-cropped with `fit`."""
    if path.endswith(".parquet") and job == "decode":
        arr = data.latents(readers.read(path)[0], cfg.latent_shape, path)  # the input rule's shape and values
        return jobs.Source(path, len(arr), cfg.latent_dim, lambda i, j: arr[i:j])
    return jobs.open_input(job, path, cfg, fit=fit)


class JobActor:
    """A Ray actor: loads the engine once, then maps batches {"index", "x"} -> {"index", "y"}."""

    def __init__(self, job: str, model_dir: str, backend: str, precision: str, threads: int, params: dict):
        from ..runtime.engine import Engine

        self.engine = Engine.load(model_dir, backend=backend, threads=threads, precision=precision)
        self.fn = jobs.make_job_fn(job, self.engine, params)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = batch["index"]
        x = np.stack(batch["x"]) if batch["x"].dtype == object else batch["x"]
        out = []
        # rows of a batch come in contiguous runs of global indices; the job keys its randomness on them
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for run in np.split(np.arange(len(index)), breaks):
            out.append(self.fn(int(index[run[0]]), x[run]))
        return {"index": index, "y": np.concatenate(out)}


def run(job: str, model_dir: str | Path, input_path: str | Path, output_path: str | Path, address: str | None = None,
        actors: int = 1, cpus_per_actor: int = 1, batch_size: int = 1024, backend: str = "onnxruntime",
        precision: str = "fp32", progress: Callable[[int], None] | None = None, max_nll_change: float | None = None,
        **params: Any) -> Path:
    """Run a batch job as a Ray Data pipeline; output .npy (input order) or a .parquet folder of shards.

    precision="auto" is decided once, here, for an actor's thread count (`tuning.choose`); actors load that path.
    """
    from .. import modeldir

    if job not in JOBS:
        raise VaeEngineError(f"unknown job {job!r}: choose one of {', '.join(JOBS)}")
    if actors < 1 or cpus_per_actor < 1:
        raise VaeEngineError("--actors and --cpus-per-actor must be at least 1")
    output_path = Path(output_path)
    if output_path.suffix not in (".npy", ".parquet"):
        raise VaeEngineError(f"{output_path}: Ray job output must end in .npy or .parquet")
    model_dir = modeldir.resolve_model_dir(model_dir)
    cfg = modeldir.model_config(model_dir)
    fit = params.pop("fit", False)
    source = _open(job, str(input_path), cfg, fit)  # validates shape/dtype up front
    item_shape = jobs.item_shape(job, cfg, params)
    if precision == "auto":
        from ..runtime import tuning
        from ..runtime.engine import Engine

        budget = tuning.DEFAULT_BUDGET if max_nll_change is None else max_nll_change
        decision = tuning.choose(Engine.load, model_dir, backend, threads=cpus_per_actor, batch=batch_size,
                                 budget=budget)
        backend, precision = decision["backend"], decision["precision"]

    ray = _require_ray()
    if not ray.is_initialized():
        if address in (None, "", "local"):
            init_local(ray, actors * cpus_per_actor)
        else:
            ray.init(address=address, log_to_driver=False)
    import ray.data

    quiet_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # at least two shards per actor (so every actor gets work), at most SHARD_ROWS rows each
    rows = min(SHARD_ROWS, max(batch_size, -(-source.n // (2 * actors))))
    shards = [{"start": i, "stop": min(source.n, i + rows)} for i in range(0, source.n, rows)]
    path = str(input_path)
    # a private local Ray: an actor that dies fails the job (one error line; rerun it) instead of restarting,
    # which also keeps Ray's core worker from warning about restarts (ray #53727); a cluster restarts actors
    restarts = {"max_restarts": 0} if address in (None, "", "local") else {}

    def read_shard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        src = _open(job, path, cfg, fit)  # memory-mapped .npy: a task reads only its shard
        xs, idx = [], []
        for start, stop in zip(batch["start"], batch["stop"], strict=True):
            xs.append(src.read(int(start), int(stop)))
            idx.append(np.arange(start, stop))
        return {"index": np.concatenate(idx), "x": np.concatenate(xs)}

    with warnings.catch_warnings():  # Ray 2.60 calls remote args deprecated, but names no other way to set this
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = (ray.data.from_items(shards)
              # reading is I/O: num_cpus=0, so readers never wait for CPUs the actors hold for their lifetime
              .map_batches(read_shard, batch_size=1, num_cpus=0)
              .map_batches(JobActor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                           fn_constructor_args=(job, str(model_dir), backend, precision, cpus_per_actor, params),
                           num_cpus=cpus_per_actor, **restarts))
    if output_path.suffix == ".parquet":
        return _write_parquet(ds, output_path)
    with atomic.array_writer(output_path, (source.n, *item_shape), jobs.output_name(job)) as out:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            y = np.stack(batch["y"]) if batch["y"].dtype == object else batch["y"]
            index = batch["index"]
            for run in np.split(np.arange(len(index)), np.flatnonzero(np.diff(index) != 1) + 1):
                # batches arrive in any order, rows in runs; flat latents take the model's latent shape
                out.write_at(int(index[run[0]]), y[run].reshape(len(run), *item_shape))
            if progress:
                progress(len(index))
    return output_path


def quiet_ray() -> None:
    """Ray's own notes (token authentication, Ray Data's execution plan and progress hints) are for cluster
    operators; a vae-engine job prints its own lines and errors. Ray sets its loggers' levels when each of its
    packages is imported, so this runs after those imports. VAE_ENGINE_RAY_LOGS=1 keeps Ray's notes."""
    import logging

    if not os.environ.get("VAE_ENGINE_RAY_LOGS"):
        for name in ("ray", "ray.data", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)


def init_local(ray, cpus: int) -> None:
    """Start a private local Ray for one job or server, quietly (`quiet_ray`)."""
    quiet_ray()
    ray.init(num_cpus=max(hardware.available_cpus(), cpus), include_dashboard=False, log_to_driver=False,
             configure_logging=False, logging_level="ERROR")


def _write_parquet(ds, output_path: Path) -> Path:
    """Ray writes the shards into a temp folder beside the target, swapped in when all are written."""
    with atomic.temp_dir(output_path.parent, output_path.name) as tmp:
        try:
            ds.write_parquet(str(tmp / "parts"))
        except OSError as exc:
            raise write_error(output_path, exc) from None
        atomic.replace_dir(tmp / "parts", output_path)
    return output_path

