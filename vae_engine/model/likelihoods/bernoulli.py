"""Bernoulli p(x|z) with logits: binary data; [0, 1] intensities are dynamically binarized (Burda et al. 2015)."""

from __future__ import annotations

import numba
import numpy as np

from ...core import config, rng
from ...core.fastmath import ZERO, softplus_neg_abs
from .base import Likelihood


@numba.njit(inline="always", fastmath=True)
def bernoulli_row(x, logits):
    """sum_p x_p l_p - softplus(l_p) over one row (log p(x|z) with logits, stable, vectorizable)."""
    acc = ZERO
    for p in range(x.shape[0]):
        lp = logits[p]
        acc += x[p] * lp - max(lp, ZERO) - softplus_neg_abs(-abs(lp))
    return acc


class Bernoulli(Likelihood):
    name = "bernoulli"
    output_name, n_params = config.DECODER_OUTPUTS[name]
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
        return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # sigmoid without overflow

    def sample(self, logits, seed=0, start=0):
        """Pixels in {0, 1}: u < sigmoid(l) with the item's binarization uniforms (`rng.binarize`)."""
        return rng.binarize(self.mean(logits), seed, start)
