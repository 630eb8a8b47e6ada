"""Backends side by side: one group per (operation, batch size), backends as the parameter.

Run: pytest bench/ --benchmark-only   (add --benchmark-json=FILE to keep the numbers)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from vae_engine.core import rng
from vae_engine.core.config import INPUT_DIM
from vae_engine.modeldir import versions
from vae_engine.runtime import bench

from .conftest import THREADS

LABELS = ("torch", "torch-compile", "ort-fp32", "ort-int8")
BATCHES = (1, 64, 1024, 8192)
VERSIONS = versions()


def _data(batch: int, latent_dim: int):
    """MNIST test images (what the shipped model and its int8 graphs were calibrated for; random pixels would
    send int8 encoders far from their calibration) and standard-normal latents."""
    images = _images()
    x = (images[np.arange(batch) % len(images)] / 255).astype(np.float32)
    return x, np.random.default_rng(batch).standard_normal((batch, latent_dim), np.float32)


@functools.cache
def _images() -> np.ndarray:
    from vae_engine.data import datasets

    return datasets.load_split(datasets.bundled_dir(), "test")[0].reshape(-1, INPUT_DIM)


def _run(benchmark, fn, batch: int):
    """Time fn; sub-100-us calls (batch 1) get many iterations per round so each round is measurable."""
    if batch == 1:
        return benchmark.pedantic(fn, rounds=200, iterations=50, warmup_rounds=5)
    return benchmark(fn)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("op", bench.OPS)
def test_backend(benchmark, engines, op, label, batch):
    engine = engines[label]
    x, z = _data(batch, engine.latent_dim)
    be = engine.backend
    fn = bench.op_call(engine, op, x, z)
    benchmark.group = f"{op} batch={batch}"
    benchmark.extra_info.update({"backend": be.name, "provider": be.provider, "precision": be.precision,
                                 "threads": THREADS, "batch": batch, "dtype": "float32", **VERSIONS})
    out = _run(benchmark, fn, batch)
    got = np.asarray(out[0] if op == "encode" else out)
    assert got.shape[0] == batch and np.isfinite(got).all()
    # what was timed is the right answer: the PyTorch reference's, within the path's precision
    ref_fn = bench.op_call(engines["torch"], op, x, z)
    ref = ref_fn()
    ref = np.asarray(ref[0] if op == "encode" else ref)
    tol = {"fp32": 1e-3, "int8": 0.5, "bf16": 0.25}[be.precision]  # int8/bf16: a few bits of each layer's inputs
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=0)


@pytest.fixture(scope="module")
def post_problem():
    b, k, d = 1024, 64, 20
    g = np.random.default_rng(0)
    x = (g.random((b, INPUT_DIM)) < 0.3).astype(np.float32)
    logits = (g.standard_normal((b, k, INPUT_DIM)) * 4).astype(np.float32)
    mu, logvar = g.standard_normal((b, d), np.float32), g.standard_normal((b, d), np.float32) - 1
    return x, logits, mu, logvar, rng.normal_eps(0, 0, b, k, d)


@pytest.mark.parametrize("impl", ["numba", "numpy", "torch"])
def test_elbo_math(benchmark, post_problem, impl):
    """log-weights + log-mean-exp over K=64 samples of 1024 inputs, the three implementations of the same math."""
    x, logits, mu, logvar, eps = post_problem
    fns = bench.postprocess_fns(x, logits, mu, logvar, eps)
    benchmark.group = "elbo-math B=1024 K=64"
    benchmark.extra_info.update({"impl": impl, "threads": THREADS, **VERSIONS})
    got = benchmark(fns[impl])
    np.testing.assert_allclose(np.asarray(got, np.float64), _log_likelihood_by_distributions(*post_problem),
                               rtol=1e-4)


def _log_likelihood_by_distributions(x, logits, mu, logvar, eps) -> np.ndarray:
    """The same estimate written independently with torch.distributions in float64: log (1/K) sum_k
    Bernoulli(x; logits_k) N(z_k; 0, I) / N(z_k; mu, sigma), z_k = mu + sigma eps_k."""
    import torch
    from torch import distributions as d

    x, logits, mu, logvar, eps = (torch.from_numpy(np.asarray(a, np.float64)) for a in (x, logits, mu, logvar, eps))
    sigma = torch.exp(0.5 * logvar)[:, None]
    z = mu[:, None] + sigma * eps  # (B, K, L)
    log_w = (d.Bernoulli(logits=logits).log_prob(x[:, None]).sum(-1) + d.Normal(0.0, 1.0).log_prob(z).sum(-1)
             - d.Normal(mu[:, None], sigma).log_prob(z).sum(-1))
    return (torch.logsumexp(log_w, -1) - np.log(log_w.shape[1])).numpy()


@pytest.mark.parametrize("label", ["torch", "ort-fp32", "ort-int8"])
def test_score_batch(benchmark, engines, label):
    """The full k-sample IWAE score of a batch: 64 inputs x K=64 samples (encode, sample, decode, Numba math)."""
    engine = engines[label]
    x, _ = _data(64, engine.latent_dim)
    benchmark.group = "score B=64 K=64"
    benchmark.extra_info.update({"backend": engine.backend.name, "precision": engine.backend.precision,
                                 "threads": THREADS, **VERSIONS})
    out = benchmark(lambda: engine.log_likelihood(x, k=64, seed=0))
    assert out.shape == (64,) and np.isfinite(out).all()
