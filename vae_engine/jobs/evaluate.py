"""The `evaluate` job: a model folder's test -ELBO and IWAE NLL with any backend and precision, optionally
against the PyTorch reference (`model.estimators`) on the same streams, and its time against the hardware limit."""

from __future__ import annotations

import numpy as np

from ..core.errors import VaeEngineError
from ..model.evaluation import evaluate, summarize


def evaluate_model(model_dir, k: int = 5000, limit: int | None = None, seed: int = 0, backend: str = "auto",
        threads: int | None = None, start=None, progress=None, compare: bool = False, precision: str = "fp32",
        data_path: str | None = None, columns: tuple[str, ...] | None = None,
        max_nll_change: float | None = None, device: str = "cpu") -> dict:
    """Evaluate a model directory on its own test split (or on `data_path`); returns the summary record.

    backend="auto": `default_backend` (at fp32 on the CPU, ONNX Runtime where the graphs are exported: the same
    NLL as the reference to ~1e-3 nats, 2.0x faster at k=5000 on the 2-core AVX2 EPYC). compare=True also runs the
    PyTorch reference on the same images and streams, and records its time, the speed ratio and the largest
    per-image difference.
    """
    import time
    from functools import partial

    from .. import data, modeldir
    from ..model import likelihoods
    from ..runtime.backends import set_threads

    train_cfg, cfg = modeldir.train_config(model_dir), modeldir.model_config(model_dir)
    if cfg.cannot_score:
        raise VaeEngineError(cfg.cannot_score)
    if data_path is not None:  # other data: any readable file or folder whose items fit the model
        from ..data import readers

        images = readers.read(data_path, columns)[0]
        data.check_fits(images.shape[1:], cfg, str(data_path))
    else:
        images, _ = data.load_test_data(train_cfg)
    images = images[:limit]
    threads = set_threads(threads)
    binarize = likelihoods.get(cfg.likelihood).binarizes(train_cfg.binarize)
    path, reference = "torch/fp32 (reference)", None
    if backend == "auto" and precision == "fp32":  # the job's default path (`default_backend`): the reference's
        from ..runtime.backends import default_backend  # numbers on ONNX Runtime's graphs, torch on a GPU

        backend = default_backend(model_dir, precision, device)
    if compare or (backend == "torch" and precision == "fp32" and device == "cpu"):  # the PyTorch reference
        from ..model.estimators import reference_scores

        reference = partial(reference_scores, modeldir.load_model(model_dir))
    if backend == "torch" and precision == "fp32" and device == "cpu":
        score_fn = reference
    else:
        from ..runtime.engine import Engine

        engine = Engine.load(model_dir, backend=backend, threads=threads, precision=precision,
                             max_nll_change=max_nll_change, device=device)
        score_fn, path = engine.scores, engine.path
        score_fn(data.to_float(images[:2]), 0, 2, seed)  # compile/warm up
    if start:
        start(len(images) * (2 if compare and score_fn is not reference else 1))
    t0 = time.perf_counter()
    nelbo, nll = evaluate(score_fn, images, k, seed, progress=progress, binarize=binarize)
    result = summarize(nelbo, nll, k, seed, time.perf_counter() - t0, backend)
    result["threads"], result["path"] = threads, path
    result["data"] = str(data_path) if data_path is not None else "test split"
    result["work"] = hardware_limit(model_dir, result["path"].split(" ")[0], len(images), k, threads,
                                    result["seconds"], device)
    if compare and score_fn is not reference:
        t0 = time.perf_counter()
        ref_nelbo, ref_nll = evaluate(reference, images, k, seed, progress=progress, binarize=binarize)
        ref_seconds = time.perf_counter() - t0
        result["reference"] = {
            "backend": "torch", "seconds": round(ref_seconds, 3), "test_nelbo": float(ref_nelbo.mean()),
            "test_nll": float(ref_nll.mean()), "speedup": ref_seconds / result["seconds"],
            "max_abs_diff_nelbo": float(np.max(np.abs(nelbo - ref_nelbo))),
            "max_abs_diff_nll": float(np.max(np.abs(nll - ref_nll))),
            "mean_diff_nll": float(np.mean(nll - ref_nll)),
        }
    return result


def hardware_limit(model_dir, path: str, n: int, k: int, threads: int, seconds: float, device: str = "cpu") -> dict:
    """The evaluation's multiply-adds (each item: the encoder twice, the decoder k + 1 times, as `Engine.scores`
    runs them, and a VampPrior's C x L per sample) by precision, and the time they take at this machine's GEMM
    peak of each precision (measured once per process, `peaks.measured_peaks`): `fraction_of_limit` = that time /
    the time taken. `path`: e.g. 'onnxruntime/int8'."""
    from functools import partial
    from pathlib import Path

    from .. import modeldir
    from ..model.engine_priors import kind
    from ..perf.fraction import fraction_of, peak_key
    from ..perf.peaks import limit_seconds, measured_peaks
    from ..perf.work import macs_by_precision

    backend, precision = path.split("/")
    cfg = modeldir.model_config(model_dir)
    key = partial(peak_key, device=device)
    macs: dict[str, float] = {}
    for role, calls in (("encoder", 2 * n), ("decoder", (k + 1) * n)):
        for p, m in macs_by_precision(Path(model_dir), cfg, role, precision, backend).items():
            macs[key(p)] = macs.get(key(p), 0.0) + m * calls
    prior_macs = kind(cfg).log_prob_macs(cfg)  # log p(z) of every sample, in fp32 (the mixture kernel)
    if prior_macs:
        macs[key("fp32")] = macs.get(key("fp32"), 0.0) + (k + 1) * n * prior_macs
    peaks = measured_peaks(threads)
    limit = limit_seconds(macs, peaks)
    return {"multiply_adds": macs, "gemm_peak_gflops": {p: peaks.get(p) for p in macs},
            "limit_seconds": float(f"{limit:.4g}") if limit else None,
            "fraction_of_limit": fraction_of(limit, seconds) if limit else None}
