"""Numba kernels against their NumPy twins and the PyTorch reference, on seeded data with identical eps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_engine.core import fastmath, rng
from vae_engine.model import kernels, likelihoods
from vae_engine.model.estimators import iwae_bound
from vae_engine.model.posterior import gaussian_log_prob, standard_normal_log_prob

BERNOULLI = likelihoods.get("bernoulli")

RTOL = 1e-4  # the kernels sum in float32 with a polynomial softplus; twins use float64 and libm


@pytest.fixture(autouse=True, scope="module")
def numba_loaded():
    """The kernels themselves: draws run on the NumPy twins only until a process has loaded Numba."""
    fastmath._load()


@pytest.fixture
def problem():
    g = np.random.default_rng(0)
    b, k, p, d = 9, 5, 784, 6
    x = (g.random((b, p)) < 0.3).astype(np.float32)
    logits = (g.standard_normal((b, k, p)) * 8).astype(np.float32)  # wide range: large |l| and near 0
    logits[0, 0, :10] = [-200, -50, -17.5, -16.9, -1e-3, 0, 1e-3, 16.9, 50, 200]
    mu = g.standard_normal((b, d)).astype(np.float32)
    logvar = (g.standard_normal((b, d)) - 1).astype(np.float32)
    eps = rng.normal_eps(11, 0, b, k, d)
    return x, logits, mu, logvar, eps


def test_rng_kernels_match_twins():
    np.testing.assert_array_equal(rng.normal_eps(5, 100, 7, 3, 4), rng.normal_eps_numpy(5, 100, 7, 3, 4))
    x = np.random.default_rng(1).random((40, 784)).astype(np.float32)
    np.testing.assert_array_equal(rng.binarize(x, 9, 3), rng.binarize_numpy(x, 9, 3))
    big = rng.normal_eps(1, 0, 2000, 32, 20)  # large enough for the parallel kernel
    np.testing.assert_array_equal(big[:3], rng.normal_eps_numpy(1, 0, 3, 32, 20))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_rng_item_twins_match_kernels():
    """Items that each name their own stream and index (a merged server batch), ranges starting on either value of
    a Box-Muller pair: the twins the jobs use before Numba loads give the kernels' very numbers."""
    keys = np.array([rng.stream_key(s, rng.EPS_STREAM) for s in (0, 1, 1, 7, 2**40)], np.uint64)
    items = np.array([0, 3, 4, 11, 2**20], np.int64)
    for k, d, s0, s1 in ((1, 16, 0, 1), (5, 3, 1, 4), (7, 1, 2, 7), (3, 5, 0, 3)):
        for parallel in (False, True):
            out = np.empty((len(keys), s1 - s0, d), np.float32)
            rng._normal_kernels[parallel](keys, items, np.int64(k), np.int64(s0), out)
            np.testing.assert_array_equal(out, rng.normal_eps_items_numpy(keys, items, k, d, s0, s1))
    x = np.random.default_rng(2).random((5, 33)).astype(np.float32)
    out = np.empty_like(x)
    rng._binarize_kernels[False](keys, items, x, out)
    np.testing.assert_array_equal(out, rng.binarize_items_numpy(x, keys, items))


@pytest.mark.parametrize("n,k,d,s0,s1", [(3, 5000, 50, 0, 5000), (1, 7, 3, 1, 6), (2, 1, 1, 0, 1), (3, 9, 5, 3, 8),
                                         (1, 40, 3, 13, 40)])
def test_parallel_eps_kernel_is_the_serial_one(n, k, d, s0, s1):
    """The parallel eps kernel splits each item's Box-Muller pairs into slices (rng.EPS_PARTS): the same numbers
    as the serial kernel and the NumPy twin, whatever the slice's parity, length (fewer pairs than slices) or item
    count."""
    want = rng.normal_eps_numpy(4, 17, n, k, d, s0, s1)
    for parallel in (False, True):
        np.testing.assert_array_equal(rng.normal_eps(4, 17, n, k, d, s0, s1, parallel=parallel), want)


def test_rng_streams_depend_on_item_index_only():
    whole = rng.normal_eps(3, 0, 10, 2, 5)
    np.testing.assert_array_equal(whole[4:7], rng.normal_eps(3, 4, 3, 2, 5))
    assert not np.array_equal(whole, rng.normal_eps(4, 0, 10, 2, 5))


def test_reparameterize(problem):
    """The kernels (serial and parallel; large draws run them) against the twin (small draws run it)."""
    _, _, mu, logvar, eps = problem
    want = kernels.reparameterize_numpy(mu, logvar, eps)
    for kernel in kernels._REPARAM:
        out = np.empty(eps.shape, np.float32)
        kernel(mu, logvar, eps, out)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(kernels.reparameterize(mu, logvar, eps), want)


def test_log_weights_match_twin_and_torch(problem):
    x, logits, mu, logvar, eps = problem
    z = kernels.reparameterize(mu, logvar, eps)
    got = kernels.log_weights(x, logits, z, mu, logvar)
    np.testing.assert_allclose(got, kernels.log_weights_numpy(x, logits, z, mu, logvar), rtol=RTOL)
    t = torch.from_numpy
    ref = (BERNOULLI.log_prob(t(x)[:, None], t(logits)) + standard_normal_log_prob(t(z))
           - gaussian_log_prob(t(z), t(mu)[:, None], t(logvar)[:, None])).numpy()
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    np.testing.assert_allclose(kernels.log_prob_rows(x, logits[:, 0]),
                               likelihoods.get("bernoulli").log_prob_numpy(x, logits[:, 0]), rtol=RTOL)


def test_log_weights_parallel_variant_agrees():
    g = np.random.default_rng(2)
    b, k, d = 16, 96, 4  # logits.size above PARALLEL_MIN: the parallel kernel runs
    x = (g.random((b, 784)) < 0.5).astype(np.float32)
    logits = g.standard_normal((b, k, 784)).astype(np.float32)
    mu, logvar = g.standard_normal((b, d)).astype(np.float32), g.standard_normal((b, d)).astype(np.float32)
    z = kernels.reparameterize(mu, logvar, rng.normal_eps(0, 0, b, k, d))
    assert logits.size >= fastmath.PARALLEL_MIN
    np.testing.assert_allclose(kernels.log_weights(x, logits, z, mu, logvar),
                               kernels.log_weights_numpy(x, logits, z, mu, logvar), rtol=RTOL)


def test_log_mean_exp_matches_twin_and_torch():
    log_w = (np.random.default_rng(3).standard_normal((6, 50)) * 30 - 100).astype(np.float32)
    got = kernels.log_mean_exp(log_w)
    np.testing.assert_allclose(got, kernels.log_mean_exp_numpy(log_w), rtol=1e-10)
    np.testing.assert_allclose(got, iwae_bound(torch.from_numpy(log_w).double()).numpy(), rtol=1e-10)
    assert kernels.log_mean_exp(np.array([[1000.0, 1000.0]], np.float32))[0] == pytest.approx(1000.0)


def test_streams_merge_keeps_each_items_eps():
    """A batch merged from several requests (rng.Streams.concat) reads, item for item, the eps each request would
    read alone; shared streams give every item the same eps; any blocking gives the same numbers."""
    from vae_engine.core import rng

    a, b = rng.Streams.contiguous(3, 0, 5), rng.Streams.contiguous(9, 40, 3)
    merged = rng.Streams.concat([a, b, rng.Streams.shared(1, 7, 2)])
    eps = merged.eps(0, 10, 6, 4)
    np.testing.assert_array_equal(eps[:5], rng.normal_eps(3, 0, 5, 6, 4))
    np.testing.assert_array_equal(eps[5:8], rng.normal_eps(9, 40, 3, 6, 4))
    np.testing.assert_array_equal(eps[8], rng.normal_eps(1, 7, 1, 6, 4)[0])
    np.testing.assert_array_equal(eps[9], eps[8])
    x = np.random.default_rng(0).random((10, 30)).astype(np.float32)  # and the binarization noise likewise
    pixels = merged.binarize(x)
    np.testing.assert_array_equal(pixels[:5], rng.binarize_numpy(x[:5], 3, 0))
    np.testing.assert_array_equal(pixels[5:8], rng.binarize_numpy(x[5:8], 9, 40))
    for row in (8, 9):
        np.testing.assert_array_equal(pixels[row], rng.binarize_numpy(x[row:row + 1], 1, 7)[0])
    blocks = np.zeros_like(eps)
    for i, j, s, e in rng.iwae_blocks(merged, 6, 4, rows=4):
        blocks[i:j, s : s + e.shape[1]] = e
    np.testing.assert_array_equal(blocks, eps)


@pytest.mark.parametrize("seed,start,n,k,d,s0,s1", [(0, 0, 3, 7, 5, 0, 7), (12345, 2**40, 4, 5000, 50, 4093, 5000),
                                                   (2**31, 99, 2, 3, 3, 1, 2)])
def test_eps_made_by_torch_are_the_kernels_eps(seed, start, n, k, d, s0, s1):
    """The eps a GPU backend makes next to its decoder (`rng.normal_eps_torch`, here on the CPU) are the Numba
    kernel's numbers bit for bit: large item indices (products past 2**63), odd pair boundaries, K split."""
    from vae_engine.core import rng

    want = rng.normal_eps(seed, start, n, k, d, s0, s1)
    np.testing.assert_array_equal(rng.Streams.contiguous(seed, start, n).eps(0, n, k, d, s0, s1, "cpu").numpy(),
                                  want)
    merged = rng.Streams.concat([rng.Streams.contiguous(3, 10, 2), rng.Streams.shared(4, 7, 3),
                                 rng.Streams.contiguous(seed, start, n)])
    for i, j in ((0, 5 + n), (1, 4), (4, 5 + n)):
        np.testing.assert_array_equal(merged.eps(i, j, k, d, s0, s1, "cpu").numpy(), merged.eps(i, j, k, d, s0, s1))


def test_permutation_is_a_seeded_shuffle():
    """Training's order of an epoch's items (the shuffle stream): a permutation, a function of the seed alone."""
    p = rng.permutation(7, 1000)
    assert sorted(p.tolist()) == list(range(1000)) and p.dtype == np.int64
    np.testing.assert_array_equal(p, rng.permutation(7, 1000))
    assert not np.array_equal(p, rng.permutation(8, 1000)) and not np.array_equal(p, np.arange(1000))


def test_numba_loads_without_scipy_linalg():
    """Loading Numba for a kernel skips SciPy's linear algebra (its BLAS probe, a fifth of Numba's set-up); SciPy
    still imports afterwards, and the kernel's answer is its twin's."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from vae_engine.core import fastmath; from vae_engine.model import kernels; "
            "g = np.random.default_rng(0); mu, lv = g.standard_normal((2, 1, 8), dtype=np.float32); "
            "eps = g.standard_normal((1, 1 << 18, 8), dtype=np.float32); z = kernels.reparameterize(mu, lv, eps); "
            "print(fastmath.loaded(), 'scipy.linalg' in sys.modules, "
            "bool(np.allclose(z, mu[:, None] + np.exp(0.5 * lv)[:, None] * eps, atol=1e-5))); "
            "import scipy.linalg; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "True", "ok"]
