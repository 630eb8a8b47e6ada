"""Running a batch job from the CLI: everything checkable is checked before a model loads, then the engine (or a
Ray Data job) streams the input to the output behind a progress bar."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import VaeEngineError
from .progress import OUT, Meter, lazy_status


def path_options(backend: str, precision: str, max_nll_change: float, device: str) -> dict:
    """The options that choose the path a job runs on, as Engine.load's keyword arguments; the device as
    `hardware.resolve_device` reads it (cpu, cuda, cuda:N, auto), a GPU that is not there one clear error."""
    from ..core.hardware import resolve_device

    return {"backend": backend, "precision": precision, "max_nll_change": max_nll_change,
            "device": resolve_device(device)}


def run_job(job: str, model_dir: Path | None, input: Path | None, output: Path, params: dict, path: dict,
            batch_size: int, threads: int | None, ray: str | None = None, actors: int = 1,
            cpus_per_actor: int = 1, n: int = 0) -> None:
    """Load the engine and the input, then stream the job with a progress bar (errors print before any bar)."""
    from ..core.config import MAX_BATCH, MAX_SCORE_K, MAX_THREADS, SEED_MAX, check_int
    from ..jobs import batch as jobs
    from ..modeldir import model_config, resolve_model_dir

    # everything that can be checked before loading a model or reading input, so a typo fails in milliseconds
    check_int("--batch-size", batch_size, 1, MAX_BATCH)
    check_int("--seed", params.get("seed", 0), 0, SEED_MAX)
    check_int("--k", params.get("k", 1), 1, MAX_SCORE_K)
    if threads is not None:
        check_int("--threads", threads, 1, MAX_THREADS)
    if ray is not None and output.suffix == "":
        raise VaeEngineError(f"{output}: a folder of PNG files is written by a local job; with --ray write .npy "
                             "or .parquet")
    if output.suffix == ".parquet" and ray is not None:
        from ..core.atomic import check_writable

        check_writable(output)
    else:
        jobs.check_output(output, images=job not in ("encode", "score"))
    model_dir = resolve_model_dir(model_dir)
    if ray is not None:
        from ..jobs import ray_jobs

        if input is None:
            raise VaeEngineError(f"{job} has no input to distribute; run it without --ray")
        with Meter(job, "items", info=f"ray {actors} actor(s)") as meter:
            meter.start(None)
            ray_jobs.run(job, model_dir, input, output, address=ray, actors=actors, cpus_per_actor=cpus_per_actor,
                         batch_size=batch_size, backend=path["backend"], precision=path["precision"],
                         progress=meter.advance, max_nll_change=path["max_nll_change"], **params)
        OUT.print(f"wrote {output}")
        return
    from ..runtime.engine import Engine

    # a bad input fails before any measuring
    source = jobs.open_input(job, input, model_config(model_dir), n, params.pop("fit", False))
    with lazy_status("choosing the fastest path (once per machine; saved in the model folder)") as status:
        engine = Engine.load(model_dir, threads=threads, batch_size=batch_size, **path,
                             progress=lambda message: status.update(f"measuring paths: {message}"),
                             items=source.n * (params.get("k", 1) if job == "score" else 1))
    with Meter(job, "items", info=f"{engine.backend.name}/{engine.backend.precision}") as meter:
        meter.start(source.n)
        # chunks of at most the model's rows per call: a large image model's progress moves item by item
        jobs.stream(source, jobs.make_job_fn(job, engine, params), output, jobs.item_shape(job, engine.cfg, params),
                 min(batch_size, engine.cfg.chunk_rows), meter.advance,
                 image_shape=engine.cfg.image_shape if job not in ("encode", "score") else None,
                 name=jobs.output_name(job))
    OUT.print(f"wrote {output} ({source.n} item{'s' * (source.n != 1)}; path {engine.path})")
