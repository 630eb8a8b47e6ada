"""Bernoulli p(x|z) with logits: binary data; [0, 1] intensities are dynamically binarized (Burda et al. 2015)."""

from __future__ import annotations

import math

import numpy as np

from ...core import onnxwire, rng
from ...core.fastmath import ONE, PARALLEL_MIN, ZERO, jit, numba, softplus_neg_abs
from .base import Likelihood, row_kernel


@row_kernel
def bernoulli_row(x, logits):
    """sum_p x_p l_p - softplus(l_p) over one row (log p(x|z) with logits, stable, vectorizable)."""
    acc = ZERO
    for p in range(x.shape[0]):
        lp = logits[p]
        acc += x[p] * lp - max(lp, ZERO) - softplus_neg_abs(-abs(lp))
    return acc


def _make_sigmoid_kernel(parallel: bool):
    def kernel(logits, out):  # flat float32
        for i in numba.prange(logits.size):
            lp = logits[i]
            e = math.exp(-abs(lp))  # in (0, 1]: no overflow for any logit
            out[i] = (ONE if lp >= ZERO else e) / (ONE + e)
    return jit(kernel, parallel)


_SIGMOID = (_make_sigmoid_kernel(False), _make_sigmoid_kernel(True))


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-l)) in float32, any shape: one Numba pass, no temporaries, accurate to float32 for every
    logit (0.5 (1 + tanh(l / 2)) loses all relative precision below about 1e-7). Batch 1 (784 logits): 6.1 us
    against 9.6 for the tanh form, 2-core AVX2 EPYC; the same at batch 1024."""
    a = np.ascontiguousarray(logits, np.float32)
    out = np.empty_like(a)
    _SIGMOID[a.size >= PARALLEL_MIN](a.reshape(-1), out.reshape(-1))
    return out


class Bernoulli(Likelihood):
    name = "bernoulli"
    unit_interval, binarized = True, True
    row = bernoulli_row

    def log_prob(self, x, logits):
        """log p(x|z) = sum_i x_i log s(l_i) + (1 - x_i) log(1 - s(l_i)) = -BCE-with-logits."""
        import torch.nn.functional as F

        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)

    def log_prob_numpy(self, x, logits):
        x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
        return np.sum(x * logits - np.logaddexp(0.0, logits), axis=-1)

    def mean_torch(self, logits):
        import torch

        return torch.sigmoid(logits)

    def mean(self, logits):
        return sigmoid(logits)

    def mean_onnx(self, params, out, dim):
        """1 / (1 + exp(-l)): as accurate as `sigmoid` (1.5e-7 relative over every normal float32 result, measured
        on l in [-90, 40]). ONNX Runtime's own Sigmoid is an approximation that loses relative precision below
        l = -10 (0.6% there, all of it below l = -15)."""
        return [onnxwire.node("Neg", [params], [f"{out}/neg"]),
                onnxwire.node("Exp", [f"{out}/neg"], [f"{out}/exp"]),
                onnxwire.node("Constant", [], [f"{out}/one"], value_float=1.0),
                onnxwire.node("Add", [f"{out}/exp", f"{out}/one"], [f"{out}/den"]),
                onnxwire.node("Reciprocal", [f"{out}/den"], [out])]

    def sample(self, logits, seed=0, start=0):
        """Pixels in {0, 1}: u < sigmoid(l) with the item's binarization uniforms (`rng.binarize`)."""
        return rng.binarize(self.mean(logits), seed, start)
