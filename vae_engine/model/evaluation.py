"""The test-set evaluation loop and its record, shared by `evaluate`, the trainer's per-epoch NLL and export:
NumPy only, so an inference install evaluates on exported graphs without PyTorch (the PyTorch reference scores
are `estimators.reference_scores`)."""

from __future__ import annotations

import numpy as np

from ..core import rng


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
    from ..data import to_float

    x = to_float(images)
    nelbo, nll = np.empty(len(x)), np.empty(len(x))
    for i in range(0, len(x), chunk):
        xb = rng.binarize(x[i : i + chunk], seed, i) if binarize else x[i : i + chunk]
        nelbo[i : i + len(xb)], nll[i : i + len(xb)] = score_fn(xb, i, k, seed)
        if progress:
            progress(len(xb))
    return nelbo, nll
