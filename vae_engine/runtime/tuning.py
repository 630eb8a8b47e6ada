"""`--precision auto`: the fastest (backend, precision) for this model on this machine, within an accuracy budget.

Each candidate path is timed on this machine at the job's batch size (an encode and a decode, after a warm-up)
and scored against the fp32 PyTorch reference on the model's own validation items with the same eps: the change
of the mean IWAE NLL (k=64, the log-likelihood the engine estimates), with its standard error, and of the mean
-ELBO, and the largest per-item change. The fastest path whose mean NLL change stays within the budget wins
(fp32 paths always qualify); the -ELBO change is reported beside it. 2,048 items, because the per-item change of
an int8 path has a spread of 0.1-0.3 nats: with 256 items the mean's standard error (~0.01-0.02) was as large as
the budget. The decision and every measurement are saved in the model folder (tuning.json), keyed by what could
change them: CPU and its flags, library versions, weights and graph files, threads, batch size, budget. A later
run with the same key reuses it; `info` shows it. `export --quantize int8` scores its candidates with the same
functions (`reference`, `accuracy`, `items_per_s`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import modeldir
from ..core import atomic, hardware
from ..core.errors import VaeEngineError
from ..modeldir import graphs

if TYPE_CHECKING:  # NumPy is imported by the functions that measure: `info` reads saved decisions without it
    import numpy as np

TUNING = "tuning.json"
SCHEMA = "vae-engine-tuning/1"
DEFAULT_BUDGET = 0.01  # nats: largest change of the mean NLL (and mean -ELBO) a faster path may cost
VALIDATION_ITEMS = 2048
ACCURACY_K = 64  # importance samples of the NLL compared (same eps for every path)
KEEP = 16  # decisions kept in tuning.json (one per key: machine, versions, threads, batch, budget)
# batches up to this size also try one thread when the thread count is not pinned: at batch 1 a second thread
# costs more in hand-offs than it adds (ONNX Runtime, 2-core EPYC: 58 + 47 us with 2 threads, 42 + 45 with 1)
SMALL_BATCH = 16
# opens one path of a model: (model_dir, backend=, precision=, threads=[, device=]) -> an Engine (`Engine.load`);
# passed in, so this module measures engines without importing the class that asks it for decisions
Load = Callable[..., Any]


def candidates(model_dir: Path, backend: str = "auto", device: str = "cpu",
               int8: bool | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """The (backend, precision) paths worth measuring here, and a note for each one left out and why.

    bf16 only where it is native (AVX512_BF16/AMX, or a GPU): emulated bf16 is slower than fp32. int8 only with
    VNNI/AMX (without them int8 dot products saturate and lose accuracy for little speed) unless `int8=True`.
    """
    from . import backends

    gpu = device == "cuda" and hardware.cuda_available()
    exported = {v: graphs.graph_path(model_dir, "encoder", v).is_file() for v in graphs.VARIANTS}
    paths, notes = [("torch", "fp32")], []
    if exported["fp32"]:
        paths.append(("onnxruntime", "fp32"))
        if backends.openvino_installed() and not gpu:
            paths.append(("openvino", "fp32"))
    else:
        notes.append("onnxruntime/openvino: not exported (vae-engine export MODEL)")
    if gpu:
        paths += [("torch", "bf16"), ("torch", "fp16")] + ([("onnxruntime", "fp16")] if exported["fp16"] else [])
    elif hardware.native_bf16():
        paths.append(("openvino", "bf16") if exported["fp32"] and backends.openvino_installed() else ("torch", "bf16"))
    else:
        notes.append("bf16: this CPU has no native bf16 (AVX512_BF16 or AMX); emulated bf16 is slower than fp32")
    if exported["int8"] and (int8 if int8 is not None else hardware.has_vnni() or gpu):
        paths.append(("onnxruntime", "int8"))
    elif exported["int8"]:
        notes.append("int8: this CPU has no VNNI/AMX int8 dot products (ask for it with --precision int8)")
    else:
        notes.append("int8: not exported (vae-engine export MODEL --quantize int8)")
    if backend != "auto":
        paths = [p for p in paths if p[0] == backend]
        if not paths:
            paths = [(backend, "fp32")]
    return paths, notes


def validation_items(model_dir: Path, n: int = VALIDATION_ITEMS, seed: int = 0) -> tuple[np.ndarray, str]:
    """Up to n items of the model's own test split in model units (binarized by the seeded stream for Bernoulli
    models, as evaluate does); if that data is gone, n samples from the model itself. Returns (x, source)."""
    import numpy as np

    from .. import data
    from ..core import rng
    from ..model.likelihoods import get

    cfg, train_cfg = modeldir.model_config(model_dir), modeldir.train_config(model_dir)
    lk = get(cfg.likelihood)
    try:
        x = data.to_float(data.load_test_data(train_cfg)[0][:n]).reshape(-1, cfg.input_dim)
        source = f"{len(x)} test items"
    except (VaeEngineError, OSError):
        import torch

        model = modeldir.load_model(model_dir)
        with torch.inference_mode():
            params = model.decoder(torch.from_numpy(modeldir.load_prior(model_dir, cfg).sample(seed, 0, n)))
            x = lk.mean(params.numpy())
        source = f"{n} samples of the model (its test data is not readable)"
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
                graph_files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"cpu": cpu, "flags": hardware.describe(threads)["flags"], "gpu": hardware.gpu_name() if device == "cuda"
            else None, "versions": versions, "weights_sha256": modeldir.weights_sha256(model_dir),
            "graphs_sha256": graph_files,
            "backend": backend, "device": device, "threads": threads, "batch": batch, "budget_nats": budget,
            "int8": int8}


def saved(model_dir: Path) -> list[dict[str, Any]]:
    """The decisions saved in the model folder (an unreadable or foreign file counts as none)."""
    path = Path(model_dir) / TUNING
    if not path.is_file():
        return []
    try:
        doc = modeldir.read_json(path, "tuning file")
    except VaeEngineError:
        return []
    ok = isinstance(doc, dict) and doc.get("schema") == SCHEMA and isinstance(doc.get("decisions"), list)
    return [d for d in doc["decisions"] if isinstance(d, dict) and isinstance(d.get("key"), dict)] if ok else []


def _save(model_dir: Path, decision: dict[str, Any]) -> bool:
    """Add a decision to tuning.json (replacing one of the same key); False when the folder is read-only."""
    decisions = [d for d in saved(model_dir) if d["key"] != decision["key"]][-(KEEP - 1):] + [decision]
    try:
        atomic.write_json(Path(model_dir) / TUNING, {"schema": SCHEMA, "decisions": decisions})
        return True
    except VaeEngineError:  # a read-only install of a model: the decision holds for this process only
        return False


def _time_path(engine, x: np.ndarray, z: np.ndarray, min_time: float) -> float:
    """Median seconds of one encode plus one decode at the job's batch size, timed by the benchmark's recipe."""
    import numpy as np

    from ..perf.timing import measure

    be = engine.backend
    return float(np.median(measure(lambda: (be.encode(x), be.decode(z)), min_time=min_time).seconds))


def reference(load: Load, model_dir: Path, threads: int) -> dict[str, Any]:
    """The fp32 PyTorch reference on the validation items: {"x", "source", "nll", "nelbo", "engine"}."""
    x_val, source = validation_items(model_dir)
    ref = load(model_dir, backend="torch", precision="fp32", threads=threads)
    return {"x": x_val, "source": source, "nll": -ref.log_likelihood(x_val, ACCURACY_K), "nelbo": -ref.elbo(x_val),
            "engine": ref}


def accuracy(engine, ref: dict[str, Any]) -> dict[str, float]:
    """A path's changes against the reference, in nats: mean NLL (and its standard error), mean -ELBO, and the
    largest and mean absolute per-item NLL change (same items, same eps)."""
    import numpy as np

    nll, nelbo = -engine.log_likelihood(ref["x"], ACCURACY_K), -engine.elbo(ref["x"])
    diff = nll - ref["nll"]
    return {"nll_change_nats": float(diff.mean()),
            "nll_change_se_nats": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
            "nelbo_change_nats": float(nelbo.mean() - ref["nelbo"].mean()),
            "max_item_nll_change_nats": float(np.max(np.abs(diff))),
            "mean_abs_item_nll_change_nats": float(np.mean(np.abs(diff)))}


def items_per_s(engine, ref: dict[str, Any], batch: int, min_time: float = 0.3) -> float:
    """Items per second of one encode plus one decode at `batch` (validation items tiled, seeded latents)."""
    import numpy as np

    x_val = ref["x"]
    x = np.ascontiguousarray(np.tile(x_val, (-(-batch // len(x_val)), 1))[:batch])
    z = np.random.default_rng(0).standard_normal((batch, engine.cfg.latent_dim)).astype(np.float32)
    return batch / _time_path(engine, x, z, min_time)


def thread_options(threads: int | None, batch: int) -> list[int]:
    """The thread counts a decision compares: the pinned count; else every available CPU, and for small batches
    (`SMALL_BATCH`) one thread too."""
    if threads is not None:
        return [threads]
    every = hardware.available_cpus()
    return [every, 1] if batch <= SMALL_BATCH and every > 1 else [every]


def measure(load: Load, model_dir: Path, paths: list[tuple[str, str]], threads: list[int], batch: int,
            device: str = "cpu", min_time: float = 0.3,
            progress: Callable[[str], None] | None = None) -> tuple[list[dict], str]:
    """Speed and accuracy of each path at each thread count of `threads` (`thread_options`; the accuracy, which
    threads do not change, is measured at the first); returns (rows, validation source)."""
    step = progress or (lambda message: None)
    step("fp32 reference")
    ref = reference(load, model_dir, threads[0])
    rows = []
    for backend, precision in paths:
        changes = None
        for n in threads:
            step(f"{backend} {precision}" + (f", {n} thread{'s' * (n > 1)}" if len(threads) > 1 else ""))
            first = (backend, precision, n) == ("torch", "fp32", threads[0])
            engine = ref["engine"] if first else load(model_dir, backend=backend, precision=precision, threads=n,
                                                      device=device)
            speed = items_per_s(engine, ref, batch, min_time)
            changes = changes or accuracy(engine, ref)
            rows.append({"backend": backend, "precision": precision, "threads": n,
                         "provider": engine.backend.provider, "seconds_per_batch": batch / speed,
                         "items_per_s": speed, **changes})
    return rows, ref["source"]


def within(row: dict[str, Any], budget: float) -> bool:
    """Does a measured path keep its mean NLL change within the budget? (fp32 paths always do.)"""
    return row["precision"] == "fp32" or abs(row["nll_change_nats"]) <= budget


def choose(load: Load, model_dir: str | Path, backend: str = "auto", device: str = "cpu", threads: int | None = None,
           batch: int = 1024, budget: float = DEFAULT_BUDGET, int8: bool | None = None, retune: bool = False,
           progress: Callable[[str], None] | None = None, min_time: float = 0.3) -> dict[str, Any]:
    """The decision for this model here: {"backend", "precision", "threads", "key", "measurements", ...}; reused
    from tuning.json when its key matches, else measured (a few seconds) and saved. `load` opens a path of the
    model (`Engine.load`, called with an explicit backend and precision). `threads` None: the thread count is
    part of the decision (`thread_options`)."""
    import numpy as np

    from ..core.config import MAX_BATCH, check_int
    from . import backends

    model_dir = Path(model_dir)
    if backend not in backends.BACKENDS:
        raise VaeEngineError(f"unknown backend {backend!r}: choose one of {', '.join(backends.BACKENDS)}")
    if not (isinstance(budget, int | float) and np.isfinite(budget) and budget >= 0):
        raise VaeEngineError(f"--max-nll-change must be a finite number of nats >= 0, got {budget!r}")
    batch = min(check_int("batch size", batch, 1, MAX_BATCH), 4096)  # larger batches run at the same rate
    options = thread_options(None if threads is None else backends.set_threads(threads), batch)
    k = key(model_dir, backend, device, options[0] if threads is not None else f"auto ({options[0]} CPUs)", batch,
            float(budget), int8)
    if not retune:
        for d in saved(model_dir):
            if d["key"] == k and d.get("backend") in backends.BACKENDS:
                return {**d, "reused": True}
    paths, notes = candidates(model_dir, backend, device, int8)
    rows, source = measure(load, model_dir, paths, options, batch, device, min_time=min_time, progress=progress)
    best = max((r for r in rows if within(r, budget)), key=lambda r: r["items_per_s"])
    decision = {"key": k, "backend": best["backend"], "precision": best["precision"], "threads": best["threads"],
                "measurements": rows,
                "validation": source, "notes": notes, "accuracy_k": ACCURACY_K,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    decision["saved"] = _save(model_dir, decision)
    return {**decision, "reused": False}


def describe_path(backend: str, precision: str, decision: dict[str, Any] | None = None) -> str:
    """One line naming the path a command ran, and for auto, why."""
    if not decision:
        return f"{backend}/{precision}"
    row = next((r for r in decision["measurements"]
                if (r["backend"], r["precision"]) == (backend, precision)), None)
    cost = f", mean NLL change {row['nll_change_nats']:+.4f} nats" if row and row["precision"] != "fp32" else ""
    n = len(decision["measurements"])
    how = "reused from tuning.json" if decision.get("reused") else f"measured {n} path{'s' * (n != 1)}"
    if isinstance(decision["key"].get("threads"), str) and "threads" in decision:  # the thread count was chosen
        how = f"{decision['threads']} thread{'s' * (decision['threads'] > 1)}; {how}"
    return f"{backend}/{precision} (auto: fastest within {decision['key']['budget_nats']} nats{cost}; {how})"

