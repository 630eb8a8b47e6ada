"""Test-set -ELBO and importance-weighted NLL (Burda et al. 2015): the PyTorch reference implementation.

Binarization and eps come from the counter-based streams of `rng`, keyed by (seed, test-image index), so any
backend that uses the same streams must reproduce these numbers exactly up to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from . import rng
from .config import SCORE_ROWS
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
