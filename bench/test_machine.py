"""The machine probe: a fixed mix of interpreter work and a small single-threaded NumPy product, timed in every
benchmark run. `pytest --benchmark` divides every other median by this one, so runs on a busy or a quiet machine
(or a faster clock) compare by ratio rather than by absolute time (bench/plugin.py)."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

A = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)


def probe() -> float:
    total = 0
    for i in range(20_000):  # interpreter work: what process start-up and checks are made of
        total += i * i % 7
    return float((A @ A).sum()) + total


def test_machine_probe(benchmark):
    with threadpool_limits(1, user_api="blas"):
        result = benchmark(probe)
    assert np.isfinite(result)
