"""Test-set -ELBO and importance-weighted NLL (Burda et al. 2015): the PyTorch reference implementation.

Binarization and eps come from the counter-based streams of `rng`, keyed by (seed, test-image index), so any
backend that uses the same streams must reproduce these numbers exactly up to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from . import rng
from .config import SCORE_ROWS
from .errors import DataError
from .model import VAE, elbo, log_weights


@torch.no_grad()
def reference_scores(model: VAE, x: np.ndarray, start: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item (-ELBO, -log p(x) IWAE estimate with k samples), each (n,) float64, for x (n, D) in model units.

    `start` is the global index of x[0]: it keys the eps streams, so results do not depend on chunking.
    -ELBO uses the analytic KL and the first eps of a k=1 stream; the IWAE estimate its own k-sample stream.
    """
    device = _device(model)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    log_sum = np.empty(len(x))  # log sum_k w_k, accumulated over K blocks (the engine's blocking, same streams)
    for i, j, s, eps in rng.iwae_blocks(rng.Streams.contiguous(seed, start, len(x)), k, model.cfg.latent_dim,
                                            SCORE_ROWS):
        log_w = log_weights(model, xt[i:j], torch.from_numpy(eps).to(device).transpose(0, 1)).double()  # (K', b)
        block = torch.logsumexp(log_w, dim=0).cpu().numpy()
        log_sum[i:j] = block if s == 0 else np.logaddexp(log_sum[i:j], block)
    return reference_nelbo(model, x, start, seed), -(log_sum - np.log(k))


@torch.no_grad()
def reference_nelbo(model: VAE, x: np.ndarray, start: int, seed: int) -> np.ndarray:
    """Per-item -ELBO (n,) float64: the analytic KL and one eps per item from the k=1 stream (seed, index).

    The one estimator of the test -ELBO: `evaluate`, `export` and the per-epoch metrics all use it."""
    device = _device(model)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    eps1 = torch.from_numpy(rng.normal_eps(seed, start, len(x), 1, model.cfg.latent_dim)).to(device).transpose(0, 1)
    return -elbo(model, xt, eps1).double().cpu().numpy()  # eps1 is (1, n, D)


def _device(model: VAE) -> torch.device:
    """Where the model's weights are (the trainer checks its test numbers on the device it trains on)."""
    return next(model.parameters()).device


def summarize(nelbo: np.ndarray, nll: np.ndarray, k: int, seed: int, seconds: float, backend: str) -> dict:
    """The evaluation record: means, standard errors and how they were measured."""
    n = len(nelbo)
    return {
        "n": n, "k": k, "seed": seed, "backend": backend, "seconds": round(seconds, 3),
        "test_nelbo": float(nelbo.mean()), "test_nelbo_stderr": float(nelbo.std() / np.sqrt(n)),
        "test_nll": float(nll.mean()), "test_nll_stderr": float(nll.std() / np.sqrt(n)),
    }


def evaluate(score_fn, images: np.ndarray, k: int, seed: int, chunk: int = 100, progress=None,
             binarize: bool = True) -> tuple:
    """Run `score_fn(x, start, k, seed) -> (nelbo, nll)` over test items (uint8 images or floats) in chunks.

    With `binarize` (Bernoulli models), items are binarized with the counter-based stream (seed, index);
    returns per-item (nelbo, nll). `progress(n)` is called after each chunk with the number of items in it.
    """
    from .data import to_float

    x = to_float(images)
    nelbo, nll = np.empty(len(x)), np.empty(len(x))
    for i in range(0, len(x), chunk):
        xb = rng.binarize(x[i : i + chunk], seed, i) if binarize else x[i : i + chunk]
        nelbo[i : i + len(xb)], nll[i : i + len(xb)] = score_fn(xb, i, k, seed)
        if progress:
            progress(len(xb))
    return nelbo, nll


def evaluate_model(model_dir, k: int = 5000, limit: int | None = None, seed: int = 0, backend: str = "torch",
        threads: int | None = None, start=None, progress=None, compare: bool = False, precision: str = "fp32",
        data_path: str | None = None, columns: tuple[str, ...] | None = None,
        max_nll_change: float | None = None, device: str = "cpu") -> dict:
    """Evaluate a model directory on its own test split (or on `data_path`); returns the summary record.

    compare=True also runs the PyTorch reference on the same images and streams, and records its time, the
    speed ratio and the largest per-image difference.
    """
    import time
    from functools import partial

    from . import checkpoint, data
    from .backends import set_threads

    train_cfg = checkpoint.train_config(model_dir)
    if data_path is not None:  # other data: any readable file or folder whose items fit the model
        from . import readers

        images = readers.read(data_path, columns)[0]
        cfg = checkpoint.model_config(model_dir)
        if not cfg.accepts(images.shape[1:]):
            raise DataError(f"{data_path}: items of shape {images.shape[1:]} do not fit this model, which takes "
                            f"{tuple(cfg.input_shape)}")
    else:
        images, _ = data.load_test_data(train_cfg)
    images = images[:limit]
    threads = set_threads(threads)
    model = checkpoint.load_model(model_dir)
    binarize = model.likelihood.binarized and train_cfg.binarize == "dynamic"
    reference = partial(reference_scores, model)
    path = "torch/fp32 (reference)"
    if backend == "torch" and precision == "fp32" and device == "cpu":
        score_fn = reference
    else:
        from .engine import Engine

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
    peak of each precision (measured once per process, `bench.measured_peaks`): `fraction_of_limit` = that time /
    the time taken. `path`: e.g. 'onnxruntime/int8'."""
    from pathlib import Path

    from . import checkpoint
    from .bench import limit_seconds, macs_by_precision, measured_peaks

    backend, precision = path.split("/")
    cfg = checkpoint.model_config(model_dir)
    key = (lambda p: p) if device == "cpu" else (lambda p: f"cuda-{p}")
    macs: dict[str, float] = {}
    for role, calls in (("encoder", 2 * n), ("decoder", (k + 1) * n)):
        for p, m in macs_by_precision(Path(model_dir), cfg, role, precision, backend).items():
            macs[key(p)] = macs.get(key(p), 0.0) + m * calls
    if cfg.prior == "vamp":  # log p(z) of every sample: C x L multiply-adds in fp32 (the mixture kernel)
        macs[key("fp32")] = macs.get(key("fp32"), 0.0) + (k + 1) * n * cfg.pseudo_inputs * cfg.latent_dim
    peaks = measured_peaks(threads)
    limit = limit_seconds(macs, peaks)
    return {"multiply_adds": macs, "gemm_peak_gflops": {p: peaks.get(p) for p in macs},
            "limit_seconds": round(limit, 3) if limit else None,
            "fraction_of_limit": round(limit / seconds, 4) if limit and seconds else None}
