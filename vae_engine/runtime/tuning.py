"""`--precision auto`: the fastest (backend, precision) for this model on this machine, within an accuracy budget.

Two measurements, kept apart because they change at different rates:

- **Accuracy is a property of the model** (and of the numerics a machine class runs a precision with: int8 with or
  without VNNI, bf16 native or emulated): each non-fp32 path is scored once against the fp32 reference (ONNX
  Runtime's fp32 graphs where exported, which export validated against PyTorch; else PyTorch) on the model's own
  validation items with the same eps: the change of the mean IWAE NLL (k=64) with its standard error, of the mean
  -ELBO, and the largest per-item change; within the budget means |mean| + 2 standard errors
  (`config.within_budget`). 2,048 items, because the per-item change of an int8 path has a spread of
  0.1-0.3 nats: with 256 items the mean's standard error (~0.01-0.02) was as large as the budget. Saved in the
  model folder (accuracy.json, shipped with a model), so a new machine of a measured class does not measure it.
- **Speed is a property of the machine**: every path within the budget (int8 included wherever it is exported)
  is timed at the job's batch size in short interleaved rounds (one encode plus one decode each), until the
  fastest is clearly ahead (its upper quartile under the runner-up's lower quartile) or `RACE_SECONDS` pass, so a
  busy moment slows every candidate alike. A decision whose ranking was not clear is raced again by the next jobs
  (`RECHECKS`), so a busy machine does not decide for good. fp32 paths always qualify.

Decisions are saved in the model folder (tuning.json), keyed by what could change them: CPU and its flags,
library versions, weights and graph files, threads, batch size, budget. Where the model folder is read-only (a
system-wide install, a container), decisions and accuracies go to the user's cache folder (`config.cache_dir`),
under the weights' hash. `info` shows them; `vae-engine tune` measures again, longer. `export --quantize int8`
scores its candidates with the same functions (`reference`, `accuracy`, `items_per_s`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import modeldir
from ..core import hardware
from ..core.config import DEFAULT_BUDGET, RECONSTRUCTION_BUDGET, within_budget
from ..core.errors import VaeEngineError
from ..modeldir import graphs

if TYPE_CHECKING:  # NumPy is imported by the functions that measure: `info` reads saved decisions without it
    import numpy as np

TUNING = "tuning.json"  # a machine's decisions
ACCURACY = "accuracy.json"  # the model's measured accuracy per path and numerics class
SCHEMA = "vae-engine-tuning/2"
ACCURACY_SCHEMA = "vae-engine-accuracy/1"
VALIDATION_ITEMS = 2048
PHOTO_ITEMS = 4  # sample photos a model without a likelihood is measured on (a 256x256 SD-VAE: ~2 s each, fp32)
# a path's accuracy is measured in the model's own terms: nats (an NLL), or for a model without a likelihood the
# mean absolute change of its reconstructions in the items' [0, 1] units ("pixels")
COST_SUFFIXES = ("_nats", "_pixels")
ACCURACY_K = 64  # importance samples of the NLL compared (same eps for every path)
KEEP = 16  # decisions kept in tuning.json (one per key: machine, versions, threads, batch, budget)
KEEP_ACCURACY = 32  # accuracy entries kept in accuracy.json (one per path, numerics class and graph files)
# batches up to this size also try one thread when the thread count is not pinned: at batch 1 a second thread
# costs more in hand-offs than it adds (ONNX Runtime, 2-core EPYC: 58 + 47 us with 2 threads, 42 + 45 with 1)
SMALL_BATCH = 16
RACE_SECONDS = 0.6  # most time the interleaved timing rounds of one decision take (`vae-engine tune`: longer)
MIN_ROUNDS = 5  # rounds every candidate is timed at least
# a job (items known) with no saved decision first times the first candidate (ONNX Runtime fp32 where exported:
# the quickest to start) on one call; a job that takes less than this at that rate runs that path and leaves the
# decision (importing, opening and racing every path: 0.3-0.6 s on the 2-core machines) to a longer job
DECIDE_SECONDS = 0.5
JOB_MIN_ROUNDS = 3  # ... in the race of a job shorter than MIN_ROUNDS rounds (its decision stays to be re-checked)
SLOW_ROW = 0.01  # seconds: a row this slow is timed at a batch that fits the race (`_timed_batch`)
SAMPLE_SECONDS = 0.002  # one timing sample runs the path this long at least (batch 1: many calls per sample)
RECHECKS = 2  # a decision whose ranking was not clear is raced again by this many later jobs (that can afford it)
# opens one path of a model: (model_dir, backend=, precision=, threads=[, device=]) -> an Engine (`Engine.load`);
# passed in, so this module measures engines without importing the class that asks it for decisions
Load = Callable[..., Any]


def candidates(model_dir: Path, backend: str = "auto", device: str = "cpu",
               int8: bool | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """The (backend, precision) paths worth measuring here, and a note for each one left out and why.

    On the CPU, where the fp32 graphs are exported, ONNX Runtime and OpenVINO run them and PyTorch eager is not
    timed (it costs a second of import alone, and ran at 0.75-0.9x ONNX Runtime on the classes measured; `--backend
    torch` runs it); without graphs, PyTorch. bf16 only where it is native (AVX512_BF16/AMX, or a GPU): emulated
    bf16 is slower than fp32. int8 wherever it is exported (its accuracy is measured on this CPU class, with or
    without VNNI), unless `int8=False`. Paths of PyTorch only where it is installed.
    """
    from . import backends

    gpu = device.split(":")[0] == "cuda" and hardware.cuda_available()
    torch = hardware.installed("torch")
    exported = {v: graphs.graph_path(model_dir, "encoder", v).is_file() for v in graphs.VARIANTS}
    paths, notes = [], []
    if gpu:
        paths.append(("torch", "fp32"))
    if exported["fp32"]:
        paths.append(("onnxruntime", "fp32"))
        if backends.openvino_installed() and not gpu:
            paths.append(("openvino", "fp32"))
        if not gpu:
            notes.append("torch/fp32: not timed where the graphs are exported (--backend torch runs it)")
    else:
        notes.append("onnxruntime/openvino: not exported (vae-engine export MODEL)")
        if not gpu and torch:
            paths.append(("torch", "fp32"))
    if gpu:
        paths += [("torch", "bf16"), ("torch", "fp16")] + ([("onnxruntime", "fp16")] if exported["fp16"] else [])
    elif hardware.native_bf16():
        if exported["fp32"] and backends.openvino_installed():
            paths.append(("openvino", "bf16"))
        elif torch:
            paths.append(("torch", "bf16"))
    else:
        notes.append("bf16: this CPU has no native bf16 (AVX512_BF16 or AMX); emulated bf16 is slower than fp32")
    if exported["int8"] and int8 is not False:
        paths.append(("onnxruntime", "int8"))
    elif not exported["int8"]:
        notes.append("int8: not exported (vae-engine export MODEL --quantize int8)")
    runnable = []  # the registry has the last word: a path the backend does not implement on this device, or
    for b, p in paths:  # that this machine lacks (ONNX Runtime without its CUDA provider), is never timed
        why = backends.unavailable(b, p, "cuda" if gpu else "cpu", model_dir)
        if why:
            notes.append(f"{b}/{p}: {why}")
        else:
            runnable.append((b, p))
    paths = runnable
    if backend != "auto":
        paths = [p for p in paths if p[0] == backend] or [(backend, "fp32")]
    if not paths:
        raise VaeEngineError(f"{model_dir}: no path to run here: its graphs are not exported and PyTorch is not "
                             "installed; run `vae-engine export` where it is (pip install 'vae-engine[train]')")
    return paths, notes


def by_reconstruction(cfg) -> bool:
    """Is a path of this model judged by its reconstructions (in [0, 1] item units) rather than in nats? Where the
    model cannot be scored: an imported autoencoder that declares no likelihood or no prior."""
    return cfg.cannot_score is not None


def validation_items(model_dir: Path, engine, n: int = VALIDATION_ITEMS, seed: int = 0) -> tuple[np.ndarray, str]:
    """Up to n items of the model's own test split in model units (binarized by the seeded stream for Bernoulli
    models, as evaluate does); if that data is gone, n samples E[x|z] of the model itself, drawn by `engine` (the
    reference). Returns (x, source)."""
    import numpy as np

    from .. import data
    from ..core import rng
    from ..model.likelihoods import get

    cfg, train_cfg = modeldir.model_config(model_dir), modeldir.train_config(model_dir)
    lk = get(cfg.likelihood)
    if by_reconstruction(cfg):  # an imported autoencoder: real photos (or seeded values for other items)
        if cfg.image_shape is not None:
            return data.sample_photos(cfg.image_shape, PHOTO_ITEMS), f"{PHOTO_ITEMS} sample photos"
        x = np.random.default_rng(seed).random((PHOTO_ITEMS, cfg.input_dim), dtype=np.float32)
        return x, f"{PHOTO_ITEMS} rows of seeded uniform values"
    if not cfg.trained:  # imported modules with a likelihood and a prior: no test split here, its own samples
        return engine.sample(n, seed), f"{n} samples of the model (an imported model brings no test data)"
    try:
        x = data.to_float(data.load_test_data(train_cfg)[0][:n]).reshape(-1, cfg.input_dim)
        source = f"{len(x)} test items"
    except (VaeEngineError, OSError):
        x, source = engine.sample(n, seed), f"{n} samples of the model (its test data is not readable)"
    if lk.binarizes(train_cfg.binarize):
        x = rng.binarize(x, seed, 0)
    return np.ascontiguousarray(x, np.float32), source


def key(model_dir: Path, backend: str, device: str, threads: int | str, batch: int, budget: float,
        int8: bool | None) -> dict[str, Any]:
    """What a decision depends on: a saved decision is reused only when all of it is equal."""
    every = modeldir.versions()
    versions = {name: every[name] for name in ("vae_engine", "torch", "onnxruntime", "numba", "openvino")}
    cpu, _ = hardware.cpu_info()
    graph_files = {}  # re-exported (or replaced) graphs are other paths: their decision is measured again
    for variant in graphs.VARIANTS:
        for role in graphs.ROLES:
            path = graphs.graph_path(model_dir, role, variant)
            if path.is_file():
                graph_files[path.name] = modeldir.file_sha256(path)
    return {"cpu": cpu, "flags": hardware.key_flags(), "gpu": hardware.gpu_name() if device == "cuda"
            else None, "versions": versions, "weights_sha256": modeldir.weights_sha256(model_dir),
            "graphs_sha256": graph_files,
            "backend": backend, "device": device, "threads": threads, "batch": batch, "budget_nats": budget,
            "int8": int8}


def _stores(model_dir: Path, name: str) -> list[Path]:
    """Where a file of decisions (or accuracies) of this model may be: the model folder, then the user's cache
    folder under the weights' hash (for model folders that cannot be written)."""
    from ..core.config import cache_dir

    try:
        cached = cache_dir() / "models" / modeldir.weights_sha256(model_dir)[:32] / name
    except VaeEngineError:
        return [Path(model_dir) / name]
    return [Path(model_dir) / name, cached]


def _entries(model_dir: Path, name: str, schema: str, field: str) -> list[dict[str, Any]]:
    """The entries saved in the model folder's and the cache's file (an unreadable or foreign file is none)."""
    return [e for path in _stores(model_dir, name) for e in modeldir.read_entries(path, schema, field)]


def _put(model_dir: Path, name: str, schema: str, field: str, entry: dict[str, Any], keep: int) -> str | None:
    """Add an entry (replacing one of the same key) to the first of `_stores` that can be written; returns where
    it went, or None when nothing can be written (the entry then holds for this process only)."""
    for path in _stores(model_dir, name):
        try:
            modeldir.put_entry(path, schema, field, entry, keep)
            return str(path)
        except (VaeEngineError, OSError):
            continue
    return None


def saved(model_dir: Path) -> list[dict[str, Any]]:
    """The decisions saved for this model, in its folder and in the user's cache, as stored (`info` shows them;
    `choose` acts only on well-formed ones)."""
    return _entries(Path(model_dir), TUNING, SCHEMA, "decisions")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, none: bool = False) -> bool:
    """A finite, non-negative number (or None where allowed)."""
    return none if value is None else _finite(value) and value >= 0


def _path_row(row: Any) -> bool:
    """A measured path: a known backend and precision, a thread count, and finite numbers."""
    from .backends import BACKENDS, PRECISIONS

    return (isinstance(row, dict) and row.get("backend") in BACKENDS[1:] and row.get("precision") in PRECISIONS
            and isinstance(row.get("threads"), int) and not isinstance(row.get("threads"), bool)
            and row["threads"] >= 1 and _number(row.get("items_per_s"), none=True)
            and _number(row.get("open_s"), none=True)
            and all(_finite(v) for k, v in row.items() if k.endswith(COST_SUFFIXES)))


def _well_formed(d: dict[str, Any]) -> bool:
    """Can a saved decision be acted on: its chosen path and every measured row are valid paths with numbers?"""
    rows = d.get("measurements")
    imports = d.get("import_s", {})
    return (_path_row({**d, "items_per_s": None, "open_s": None}) and isinstance(rows, list) and bool(rows)
            and all(_path_row(r) for r in rows) and isinstance(imports, dict)
            and all(_number(v) for v in imports.values()))


def numerics(backend: str, precision: str, device: str) -> str:
    """The arithmetic a path runs with on this machine, which its accuracy depends on: int8 with or without VNNI
    dot products, bf16 native or emulated, the GPU's own."""
    if device.split(":")[0] == "cuda":
        return f"gpu {hardware.gpu_name()}"
    if precision == "int8":
        return "int8-vnni" if hardware.has_vnni() else "int8-no-vnni"
    if precision == "bf16":
        return "bf16-native" if hardware.native_bf16() else "bf16-emulated"
    return precision


def accuracy_key(model_dir: Path, backend: str, precision: str, device: str, ref_path: str) -> dict[str, Any]:
    """What a path's measured accuracy depends on: the path and its numerics here, the runtime's version, the
    weights and the graph files it runs, the reference and the validation."""
    from .backends.ort import GRAPHS

    variant = GRAPHS.get(precision, "fp32") if backend != "torch" else None
    files = {}
    for role in graphs.ROLES if variant else ():
        path = graphs.graph_path(model_dir, role, variant)
        if path.is_file():
            files[path.name] = modeldir.file_sha256(path)
    runtime = {"torch-compile": "torch"}.get(backend, backend)
    return {"backend": backend, "precision": precision, "numerics": numerics(backend, precision, device),
            "runtime": modeldir.versions().get(runtime), "weights_sha256": modeldir.weights_sha256(model_dir),
            "graphs_sha256": files, "reference": ref_path, "validation_items": VALIDATION_ITEMS,
            "accuracy_k": ACCURACY_K}


def reference_path(model_dir: Path) -> tuple[str, str]:
    """The fp32 reference accuracy is measured against: ONNX Runtime's fp32 graphs where exported (export
    validated them against PyTorch; no PyTorch needed), else PyTorch."""
    return ("onnxruntime", "fp32") if graphs.graph_path(model_dir, "encoder", "fp32").is_file() else ("torch", "fp32")


def accuracies(load: Load, model_dir: Path, paths: list[tuple[str, str]], threads: int, device: str = "cpu",
               progress: Callable[[str], None] | None = None) -> dict[tuple[str, str], dict[str, Any] | None]:
    """Each path's accuracy against the fp32 reference (None for fp32 paths, which always qualify): read from
    accuracy.json where this model, path and numerics class were measured before, else measured now (once) and
    saved."""
    step = progress or (lambda message: None)
    ref_path = reference_path(model_dir)
    known = {_freeze(e["key"]): e for e in _entries(model_dir, ACCURACY, ACCURACY_SCHEMA, "paths")
             if (_finite(e.get("nll_change_nats")) or _finite(e.get("reconstruction_change_pixels")))
             and all(_finite(v) for k, v in e.items() if k.endswith(COST_SUFFIXES))}
    out, ref = {}, None
    for backend, precision in paths:
        if precision == "fp32":
            out[backend, precision] = None
            continue
        k = accuracy_key(model_dir, backend, precision, device, "/".join(ref_path))
        entry = known.get(_freeze(k))
        if entry is None:
            if ref is None:
                step(f"accuracy: fp32 reference ({'/'.join(ref_path)})")
                ref = reference(load, model_dir, threads, ref_path[0])
            step(f"accuracy: {backend} {precision} (once per model and CPU class)")
            engine = load(model_dir, backend=backend, precision=precision, threads=threads, device=device)
            entry = {"key": k, **accuracy(engine, ref), "validation": ref["source"],
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _put(model_dir, ACCURACY, ACCURACY_SCHEMA, "paths", entry, KEEP_ACCURACY)
        out[backend, precision] = {k2: v for k2, v in entry.items() if k2.endswith(COST_SUFFIXES)}
    return out


def _freeze(value: Any) -> Any:
    """A hashable form of a JSON value (for looking keys up)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def reference(load: Load, model_dir: Path, threads: int, backend: str = "torch") -> dict[str, Any]:
    """The fp32 reference on the validation items: {"x", "source", "nll", "nelbo", "engine"}; for a model without
    a likelihood {"x", "source", "reconstruction", "engine"}."""
    ref = load(model_dir, backend=backend, precision="fp32", threads=threads)
    x_val, source = validation_items(model_dir, ref)
    if by_reconstruction(ref.cfg):
        return {"x": x_val, "source": source, "reconstruction": ref.reconstruct(x_val), "engine": ref}
    return {"x": x_val, "source": source, "nll": -ref.log_likelihood(x_val, ACCURACY_K), "nelbo": -ref.elbo(x_val),
            "engine": ref}


def accuracy(engine, ref: dict[str, Any]) -> dict[str, float]:
    """A path's changes against the reference, in nats: mean NLL (and its standard error), mean -ELBO, and the
    largest and mean absolute per-item NLL change (same items, same eps)."""
    import numpy as np

    if "reconstruction" in ref:  # no likelihood: each item's mean absolute change of its reconstruction
        diff = np.abs(engine.reconstruct(ref["x"]) - ref["reconstruction"]).mean(axis=1, dtype=np.float64)
        return {"reconstruction_change_pixels": float(diff.mean()),
                "reconstruction_change_se_pixels": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1
                else 0.0,
                "max_item_reconstruction_change_pixels": float(diff.max())}
    nll, nelbo = -engine.log_likelihood(ref["x"], ACCURACY_K), -engine.elbo(ref["x"])
    diff = nll - ref["nll"]
    return {"nll_change_nats": float(diff.mean()),
            "nll_change_se_nats": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
            "nelbo_change_nats": float(nelbo.mean() - ref["nelbo"].mean()),
            "max_item_nll_change_nats": float(np.max(np.abs(diff))),
            "mean_abs_item_nll_change_nats": float(np.mean(np.abs(diff)))}


def _inputs(engine, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded items in [0, 1] and latents of a batch, for timing (speed does not depend on the values)."""
    import numpy as np

    g = np.random.default_rng(0)
    return (g.random((batch, engine.cfg.input_dim), dtype=np.float32),
            g.standard_normal((batch, engine.cfg.latent_dim), dtype=np.float32))


def items_per_s(engine, batch: int, min_time: float = 0.3) -> float:
    """Items per second of one encode plus one decode at `batch`, timed by the benchmark's recipe."""
    import numpy as np

    from ..perf.timing import measure

    fn = _encode_decode(engine.backend, *_inputs(engine, batch))
    return batch / float(np.median(measure(fn, min_time=min_time).seconds))


def thread_options(threads: int | None, batch: int) -> list[int]:
    """The thread counts a decision compares: the pinned count; else every available CPU, and for small batches
    (`SMALL_BATCH`) one thread too."""
    if threads is not None:
        return [threads]
    every = hardware.available_cpus()
    return [every, 1] if batch <= SMALL_BATCH and every > 1 else [every]


def race(fns: dict[Any, Callable[[], Any]], seconds: float = RACE_SECONDS, min_rounds: int = MIN_ROUNDS,
         job_calls: float | None = None) -> tuple[dict[Any, list[float]], bool]:
    """Time each function in interleaved rounds (each round every function once, in a rotated order) until the
    fastest is clearly ahead (its 75th percentile under every other's 25th) or `seconds` pass. Returns the seconds
    per call of each round per function, and whether the ranking was clear. One sample runs a function at least
    `SAMPLE_SECONDS` (many calls at batch 1), so timer and scheduler noise stay small against it. `job_calls`: the
    job ahead, in calls; the race then also ends (after `min_rounds`) once it has run as long as the job takes at
    the fastest rate measured, so a short job is not held up by its own decision (which stays unclear, to be
    raced again by a job that can afford it)."""
    import numpy as np

    reps = {}
    for name, fn in fns.items():  # warm up (first calls allocate), and size each sample by it (a first call is
        t0 = time.perf_counter()  # the slowest, so samples come out no shorter than SAMPLE_SECONDS)
        fn()
        reps[name] = max(1, math.ceil(SAMPLE_SECONDS / max(time.perf_counter() - t0, 1e-7)))
    if job_calls is not None and job_calls < min_rounds * len(fns):  # a job shorter than the rounds themselves
        min_rounds = min(min_rounds, JOB_MIN_ROUNDS)
    times: dict[Any, list[float]] = {name: [] for name in fns}
    names, start, rounds = list(fns), time.perf_counter(), 0
    end = start + seconds
    while True:
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            fn, n = fns[name], reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
        rounds += 1
        if rounds == 1 and time.perf_counter() - start > seconds:  # one round is longer than the whole budget:
            min_rounds = min(min_rounds, JOB_MIN_ROUNDS)  # the fewest rounds that rank (quartiles of 3 samples)
        if rounds < min_rounds:
            continue
        order = sorted(names, key=lambda m: np.median(times[m]))
        clear = len(order) == 1 or np.percentile(times[order[0]], 75) < min(
            np.percentile(times[m], 25) for m in order[1:])
        now = time.perf_counter()
        if clear or now > end or (job_calls is not None and now - start > job_calls * np.median(times[order[0]])):
            return times, bool(clear)


def _encode_decode(be, x: np.ndarray, z: np.ndarray) -> Callable[[], Any]:
    """One encode and one decode of a backend: what a path is timed on."""
    return lambda: (be.encode(x), be.decode(z))


def time_paths(load: Load, model_dir: Path, paths: list[tuple[str, str]], threads: list[int], batch: int,
               device: str = "cpu", seconds: float = RACE_SECONDS,
               progress: Callable[[str], None] | None = None,
               items: int | None = None) -> tuple[list[dict[str, Any]], bool]:
    """Items per second of each path at each thread count, raced in interleaved rounds (`race`, for about as long
    as a job of `items` items takes when given); returns the rows and whether the ranking was clear. A single
    candidate is not timed at all (nothing to choose)."""
    import numpy as np

    step = progress or (lambda message: None)
    engines, opened = {}, {}
    for backend, precision in paths:
        for n in threads:
            step(f"opening {backend} {precision}" + (f", {n} thread{'s' * (n > 1)}" if len(threads) > 1 else ""))
            t0 = time.perf_counter()
            engine = engines[backend, precision, n] = load(model_dir, backend=backend, precision=precision,
                                                           threads=n, device=device)
            _encode_decode(engine.backend, *_inputs(engine, 1))()  # sessions open on first use: count them here
            opened[backend, precision, n] = time.perf_counter() - t0
    if len(engines) == 1:
        (b, p, n), engine = next(iter(engines.items()))
        return [{"backend": b, "precision": p, "threads": n, "provider": engine.backend.provider,
                 "items_per_s": None, "open_s": opened[b, p, n], "rounds": 0}], True
    timed = _timed_batch(next(iter(engines.values())), batch, seconds)
    fns = {name: _encode_decode(engine.backend, *_inputs(engine, timed)) for name, engine in engines.items()}
    step(f"timing {len(fns)} paths at batch {timed}")
    times, clear = race(fns, seconds, job_calls=None if items is None else items / timed)
    rows = [{"backend": b, "precision": p, "threads": n, "provider": engines[b, p, n].backend.provider,
             "timed_batch": timed, "seconds_per_batch": float(np.median(t)), "items_per_s": timed / float(np.median(t)),
             "spread": float((np.percentile(t, 75) - np.percentile(t, 25)) / np.median(t)), "rounds": len(t),
             "open_s": opened[b, p, n]}
            for (b, p, n), t in times.items()]
    return rows, clear


def _timed_batch(engine, batch: int, seconds: float) -> int:
    """The batch a race times for a decision at `batch`: the same, unless a single row takes over `SLOW_ROW`
    seconds and a call of `batch` rows over a quarter of the race's budget; then as many rows as fit in that (at
    least 1). Rows that slow (an imported image autoencoder: ~1-4 s each) run at the same rate whatever their batch
    (a call's fixed cost, ~0.1 ms, is lost in them), and a decision at batch 256 would otherwise time minutes of
    calls per path. A small model's batch-1 call is mostly that fixed cost: its batch is never changed."""
    t0 = time.perf_counter()
    _encode_decode(engine.backend, *_inputs(engine, 1))()  # the engine is open and warm (`time_paths`)
    per_row = time.perf_counter() - t0
    if per_row <= SLOW_ROW:
        return batch
    return max(1, min(batch, int(seconds / 4 / per_row)))


RUNTIMES = {"torch": "torch", "torch-compile": "torch", "onnxruntime": "onnxruntime",
            "openvino": "vae_engine.runtime.backends.ovlib"}  # the modules each path imports


def import_seconds(paths: list[tuple[str, str]]) -> dict[str, float]:
    """Seconds to import each path's runtime, as a job's fresh process pays them (0 where this process has it
    already); part of what a path costs a short job."""
    import importlib
    import sys

    out = {}
    for backend, _ in paths:
        module = RUNTIMES.get(backend, backend)
        if backend in out or module in sys.modules:
            out.setdefault(backend, 0.0)
            continue
        t0 = time.perf_counter()
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # opening the path says what is missing
        out[backend] = time.perf_counter() - t0
    return out


def for_items(decision: dict[str, Any], items: int) -> dict[str, Any]:
    """The measured path that finishes a job of `items` items (or decoder rows) soonest: its runtime's import
    and its opening, then the items at its measured rate. A short job takes the path that starts fastest, a long
    one the fastest path. A runtime's first session pays its own set-up, so every path of a runtime is charged
    its slowest opening (the order paths were opened in does not decide); costs not recorded count as zero."""
    imports = decision.get("import_s") or {}
    opening: dict[str, float] = {}
    for row in decision["measurements"]:
        opening[row["backend"]] = max(opening.get(row["backend"], 0.0), row.get("open_s") or 0.0)

    def seconds(row: dict[str, Any]) -> float:
        rate = row.get("items_per_s") or 0.0
        return imports.get(row["backend"], 0.0) + opening[row["backend"]] + (items / rate if rate else 0.0)

    return min(decision["measurements"], key=seconds)


def _short_job(load: Load, model_dir: Path, path: tuple[str, str], threads: int, device: str, batch: int,
               items: int, k: dict[str, Any]) -> dict[str, Any] | None:
    """For a job of `items` items with no decision saved: `path` timed on one call at the job's batch; a decision
    to run it (not saved; "engine": the engine it was timed on, for the job to run on) when the job takes under
    DECIDE_SECONDS at that rate, else None (measure the paths)."""
    engine = load(model_dir, backend=path[0], precision=path[1], threads=threads, device=device)
    seconds = race({path: _encode_decode(engine.backend, *_inputs(engine, batch))}, 0.0, min_rounds=1)[0][path][0]
    job = items * seconds / batch
    if job >= DECIDE_SECONDS:
        return None
    row = {"backend": path[0], "precision": path[1], "threads": threads, "provider": engine.backend.provider,
           "items_per_s": batch / seconds, "rounds": 1}
    return {"key": k, "backend": path[0], "precision": path[1], "threads": threads, "measurements": [row],
            "clear": False, "checks": 0, "saved": False, "reused": False, "short_job": job, "for_items": items,
            "engine": engine}  # the job runs on it (not saved: the decision is never written)


def affords_recheck(decision: dict[str, Any], items: int | None) -> bool:
    """May a job of `items` items (None: a server or a long-lived engine) race an unclear decision again? Only
    when the job itself takes at least what the race costs (importing and opening every measured path), so a short
    job is never several times its own work; a long job or a server re-checks."""
    if items is None:
        return True
    rate = max((r.get("items_per_s") or 0.0) for r in decision["measurements"])
    cost = sum((decision.get("import_s") or {}).values())
    cost += sum(r.get("open_s") or 0.0 for r in decision["measurements"])
    return rate > 0 and items / rate >= cost


def within(row: dict[str, Any], budget: float) -> bool:
    """Does a path keep its mean NLL change within the budget, by the one rule (`config.within_budget`: the mean
    and its standard error)? A model without a likelihood: its mean reconstruction change within
    `RECONSTRUCTION_BUDGET`. fp32 paths always do."""
    if row["precision"] == "fp32":
        return True
    if "reconstruction_change_pixels" in row:
        return within_budget(row["reconstruction_change_pixels"], row.get("reconstruction_change_se_pixels", 0.0),
                             RECONSTRUCTION_BUDGET)
    return within_budget(row["nll_change_nats"], row.get("nll_change_se_nats", 0.0), budget)


def cost_text(row: dict[str, Any]) -> str:
    """A measured path's accuracy cost in the model's own terms, e.g. "mean NLL change +0.0012 nats"."""
    if "reconstruction_change_pixels" in row:
        return f"mean reconstruction change {row['reconstruction_change_pixels']:.4f} (items in [0, 1])"
    return f"mean NLL change {row['nll_change_nats']:+.4f} nats"


def budget_text(decision: dict[str, Any]) -> str:
    """What a decision's paths had to keep within."""
    if decision.get("budget") == "reconstruction":
        return f"a mean reconstruction change of {RECONSTRUCTION_BUDGET:.4f}"
    return f"{decision['key']['budget_nats']} nats"


def choose(load: Load, model_dir: str | Path, backend: str = "auto", device: str = "cpu", threads: int | None = None,
           batch: int = 1024, budget: float = DEFAULT_BUDGET, int8: bool | None = None, retune: bool = False,
           progress: Callable[[str], None] | None = None, seconds: float = RACE_SECONDS,
           items: int | None = None) -> dict[str, Any]:
    """The decision for this model here: {"backend", "precision", "threads", "key", "measurements", ...}; reused
    from tuning.json when its key matches (and its ranking was clear, or was re-checked `RECHECKS` times), else
    measured (about a second, plus each path's accuracy the first time on a CPU class) and saved. `load` opens a
    path of the model (`Engine.load`, called with an explicit backend and precision). `threads` None: the thread
    count is part of the decision (`thread_options`). `items`: the job ahead, when known; its decision costs about
    what the job does (`race`'s job_calls, `affords_recheck`)."""
    import numpy as np

    from ..core.config import MAX_BATCH, check_int
    from . import backends

    model_dir = Path(model_dir)
    if backend not in backends.BACKENDS:
        raise VaeEngineError(f"unknown backend {backend!r}: choose one of {', '.join(backends.BACKENDS)}")
    if not (isinstance(budget, int | float) and np.isfinite(budget) and budget >= 0):
        raise VaeEngineError(f"--max-nll-change must be a finite number of nats >= 0, got {budget!r}")
    # larger batches run at the same rate: four runtime calls' rows (4096 MNIST items; 16 SD-VAE 256x256 images)
    cfg = modeldir.model_config(model_dir)
    batch = min(check_int("batch size", batch, 1, MAX_BATCH), 4 * cfg.chunk_rows)
    options = thread_options(None if threads is None else backends.set_threads(threads), batch)
    k = key(model_dir, backend, device, options[0] if threads is not None else f"auto ({options[0]} CPUs)", batch,
            float(budget), int8)
    previous = next((d for d in saved(model_dir) if d["key"] == k and _well_formed(d)), None)
    if previous and not retune and (previous.get("clear", True) or previous.get("checks", 0) >= RECHECKS
                                    or not affords_recheck(previous, items)):
        return {**previous, "reused": True}
    paths, notes = candidates(model_dir, backend, device, int8)
    if items is not None and not previous and not retune and len(paths) > 1:
        short = _short_job(load, model_dir, paths[0], options[0], device, min(batch, items), items, k)
        if short is not None:
            return short
    imports = import_seconds(paths)  # before anything else imports them
    costs = accuracies(load, model_dir, paths, options[0], device, progress)
    fits = []
    for path in paths:
        row = {"backend": path[0], "precision": path[1], **(costs[path] or {})}
        if within(row, budget):
            fits.append(path)
        else:
            notes.append(f"{path[0]}/{path[1]}: {cost_text(row)} is over the budget; not timed")
    rows, clear = time_paths(load, model_dir, fits, options, batch, device, seconds, progress, items)
    rows = [{**r, **(costs[r["backend"], r["precision"]] or {})} for r in rows]
    best = max(rows, key=lambda r: r["items_per_s"] or 0.0)
    decision = {"key": k, "backend": best["backend"], "precision": best["precision"], "threads": best["threads"],
                "measurements": rows, "clear": clear, "import_s": imports,
                "checks": previous.get("checks", 0) + 1 if previous and not retune else 0,
                "accuracy": {f"{b}/{p}": c for (b, p), c in costs.items() if c}, "notes": notes,
                "budget": "reconstruction" if by_reconstruction(cfg) else "nll",
                "accuracy_k": ACCURACY_K, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    where = _put(model_dir, TUNING, SCHEMA, "decisions", decision, KEEP)
    return {**decision, "saved": where is not None, "saved_to": where, "reused": False}


def describe_path(backend: str, precision: str, decision: dict[str, Any] | None = None) -> str:
    """One line naming the path a command ran, and for auto, why."""
    if not decision:
        return f"{backend}/{precision}"
    if "short_job" in decision:
        return (f"{backend}/{precision} (auto: a job this short, ~{decision['short_job']:.2f} s of work here, is "
                "not worth measuring every path for; a longer job or `vae-engine tune` decides)")
    row = next((r for r in decision["measurements"]
                if (r["backend"], r["precision"]) == (backend, precision)), None)
    cost = f", {cost_text(row)}" if row and row["precision"] != "fp32" else ""
    n = len(decision["measurements"])
    how = "reused from tuning.json" if decision.get("reused") else f"measured {n} path{'s' * (n != 1)}"
    if decision.get("for_items"):  # a job's choice: start-up counted against its size
        how = f"soonest done for {decision['for_items']:,} items; {how}"
    if isinstance(decision["key"].get("threads"), str) and "threads" in decision:  # the thread count was chosen
        how = f"{decision['threads']} thread{'s' * (decision['threads'] > 1)}; {how}"
    return f"{backend}/{precision} (auto: fastest within {budget_text(decision)}{cost}; {how})"

