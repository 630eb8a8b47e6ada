"""Diagonal Gaussian p(x|z) for real-valued data: the decoder gives a mean and a log-variance per feature.

params = [mean (D) | logvar (D)] in the units of the raw data: a model trained on standardized features maps
them back inside the decoder (mean * std + shift, logvar + 2 log std), so the log-density below includes the
change-of-variables term -sum log std and is comparable across preprocessings.
log N(x; m, v) = -1/2 (log 2 pi + log v + (x - m)^2 / v), summed over features.
"""

from __future__ import annotations

import numpy as np

from ...core import config, onnxwire, rng
from ...core.fastmath import exp as _exp
from .base import Likelihood, row_kernel

LOG_2PI = config.LOG_2PI
_HALF_LOG_2PI = np.float32(0.5 * LOG_2PI)
_HALF = np.float32(0.5)


@row_kernel
def gaussian_row(x, params):
    """Row of log N(x; m, exp(lv)) from params [m | lv] (D each), with the vectorizable exp of core/fastmath.py."""
    d = x.shape[0]
    acc = np.float32(0.0)
    for p in range(d):
        r = x[p] - params[p]
        lv = params[d + p]
        acc -= _HALF_LOG_2PI + _HALF * (lv + r * r * _exp(-lv))
    return acc


class Gaussian(Likelihood):
    name = "gaussian"
    unit_interval, binarized = False, False
    row = gaussian_row

    def log_prob(self, x, params):
        import torch

        mean, logvar = params.chunk(2, dim=-1)
        return -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar)).sum(-1)

    def log_prob_numpy(self, x, params):
        x, params = np.asarray(x, np.float64), np.asarray(params, np.float64)
        mean, logvar = np.split(params, 2, axis=-1)
        return -0.5 * np.sum(LOG_2PI + logvar + (x - mean) ** 2 * np.exp(-logvar), axis=-1)

    def mean_torch(self, params):
        return params.chunk(2, dim=-1)[0]

    def mean(self, params):
        return np.ascontiguousarray(np.split(np.asarray(params, np.float32), 2, axis=-1)[0])

    def mean_onnx(self, params, out, dim):
        """The first half of [mean | logvar]."""
        consts = [onnxwire.node("Constant", [], [f"{out}/{name}"], value_ints=[v])
                  for name, v in (("start", 0), ("end", dim), ("axis", 1))]
        return [*consts, onnxwire.node("Slice", [params, f"{out}/start", f"{out}/end", f"{out}/axis"], [out])]

    def sample(self, params, seed=0, start=0):
        """x = mean + exp(logvar / 2) * eps, eps ~ N(0, I) from the item's observation stream."""
        mean, logvar = np.split(np.asarray(params, np.float32), 2, axis=-1)
        eps = rng.normal_eps(seed, start, len(mean), 1, mean.shape[-1], stream=rng.OBSERVATION_STREAM)[:, 0]
        return (mean + np.exp(0.5 * logvar) * eps).astype(np.float32)
