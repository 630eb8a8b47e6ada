"""The one timing recipe: warm up, then repeat until a minimum time has passed; per-call latencies, their
percentiles and the rate they imply. The benchmark, the precision tuner and the GEMM peaks all time with it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Timing:
    """Per-call latencies of one measured function."""

    seconds: np.ndarray  # (repeats,)

    def summary(self, items: int, flops: float = 0.0) -> dict[str, float]:
        p50, p90, p99 = np.percentile(self.seconds, [50, 90, 99])
        return {"repeats": len(self.seconds), "mean_us": float(self.seconds.mean() * 1e6), "p50_us": float(p50 * 1e6),
                "p90_us": float(p90 * 1e6), "p99_us": float(p99 * 1e6), "samples_per_s": float(items / p50),
                "gflops": float(flops * items / p50 / 1e9)}


def measure(fn: Callable[[], Any], min_time: float = 0.5, warmup: int = 3, min_repeats: int = 5,
            max_repeats: int = 2000) -> Timing:
    """Warm up, then call fn repeatedly (at least min_repeats, until min_time has passed), timing each call."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_repeats or (time.perf_counter() < t_end and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(np.asarray(times))


def best_rate(fn: Callable[[], Any], flops: float, min_time: float) -> float:
    """GFLOP/s of the best timed call of fn (a peak is the best the machine did, not its average)."""
    t = measure(fn, min_time=min_time, warmup=2, min_repeats=3)
    return flops / float(np.min(t.seconds)) / 1e9  # peak: the best call
