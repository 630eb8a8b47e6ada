"""Continuous Bernoulli p(x|z) for intensities in [0, 1] (Loaiza-Ganem & Cunningham 2019), with logits l.

p(x|l) = C(l) s(l)^x (1 - s(l))^(1-x), x in [0, 1], with the normalizing constant
C(l) = 2 atanh(1 - 2s) / (1 - 2s) = l / tanh(l/2)  (since 1 - 2 s(l) = -tanh(l/2) and atanh of it is -l/2),
an even function with C(0) = 2. log C = log|l| - log tanh(|l|/2) away from 0 and, for |l| < 1e-2,
the series log 2 + l^2/12 - 7 l^4/1440 (error below 1e-13), so it is stable at s = 0.5.
E[x] = s/(2s - 1) + 1/(2 atanh(1 - 2s)) = s(l)/tanh(l/2) - 1/l, with the series 1/2 + l/12 - l^3/720 near 0.
"""

from __future__ import annotations

import math

import numpy as np

from ...core import rng
from ...core.fastmath import ZERO, inline, softplus_neg_abs
from .base import Likelihood, row_kernel

SERIES = 1e-2  # |l| below this uses the series (in float32 and float64 alike)
_LOG2 = math.log(2.0)


@inline
def _log_norm(l):  # noqa: E741 - l is the paper's logit
    a = abs(l)
    if a < SERIES:
        a2 = a * a
        return _LOG2 + a2 / 12.0 - 7.0 * a2 * a2 / 1440.0
    return math.log(a) - math.log(math.tanh(0.5 * a))


@row_kernel
def continuous_bernoulli_row(x, logits):
    """sum_p x_p l_p - softplus(l_p) + log C(l_p) over one row."""
    acc = ZERO
    for p in range(x.shape[0]):
        lp = logits[p]
        acc += x[p] * lp - max(lp, ZERO) - softplus_neg_abs(-abs(lp)) + np.float32(_log_norm(lp))
    return acc


def log_norm_numpy(logits: np.ndarray) -> np.ndarray:
    """log C(l), float64."""
    a = np.abs(np.asarray(logits, np.float64))
    small = a < SERIES
    safe = np.where(small, 1.0, a)
    return np.where(small, _LOG2 + a**2 / 12.0 - 7.0 * a**4 / 1440.0, np.log(safe) - np.log(np.tanh(0.5 * safe)))


class ContinuousBernoulli(Likelihood):
    name = "continuous-bernoulli"
    unit_interval, binarized = True, False
    row = continuous_bernoulli_row

    def log_prob(self, x, logits):
        import torch
        import torch.nn.functional as F

        a = logits.abs()
        small = a < SERIES
        safe = torch.where(small, torch.ones_like(a), a)
        log_c = torch.where(small, _LOG2 + a**2 / 12.0 - 7.0 * a**4 / 1440.0,
                            torch.log(safe) - torch.log(torch.tanh(0.5 * safe)))
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        return (log_c - bce).sum(-1)

    def log_prob_numpy(self, x, logits):
        x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
        return np.sum(x * logits - np.logaddexp(0.0, logits) + log_norm_numpy(logits), axis=-1)

    def mean_torch(self, logits):
        import torch

        small = logits.abs() < SERIES
        safe = torch.where(small, torch.ones_like(logits), logits)
        return torch.where(small, 0.5 + logits / 12.0 - logits**3 / 720.0,
                           torch.sigmoid(safe) / torch.tanh(0.5 * safe) - 1.0 / safe)

    def mean(self, logits):  # no `mean_onnx`: sigmoid / tanh - 1 / l cancels near l = 0 in float32
        logits = np.asarray(logits, np.float64)
        small = np.abs(logits) < SERIES
        safe = np.where(small, 1.0, logits)
        sig = 0.5 * (1.0 + np.tanh(0.5 * safe))
        out = np.where(small, 0.5 + logits / 12.0 - logits**3 / 720.0, sig / np.tanh(0.5 * safe) - 1.0 / safe)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def sample(self, logits, seed=0, start=0):
        """By the inverse CDF: F(x) = (e^(l x) - 1) / (e^l - 1), so x = log1p(u (e^l - 1)) / l (x = u at l = 0),
        u the item's binarization uniforms; in float64, logits clipped to +-80 where exp is still exact enough."""
        lg = np.clip(np.asarray(logits, np.float64), -80.0, 80.0)
        u = rng.uniform_rows(seed, rng.BINARIZE_STREAM, start, *lg.shape)
        small = np.abs(lg) < 1e-6
        safe = np.where(small, 1.0, lg)
        x = np.where(small, u, np.log1p(u * np.expm1(safe)) / safe)
        return np.clip(x, 0.0, 1.0).astype(np.float32)
