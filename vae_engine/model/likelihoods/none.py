"""No likelihood: an imported autoencoder whose decoder returns E[x|z] itself (diffusers' AutoencoderKL, a user's
decoder declared with likelihood "none"). Encode, decode and reconstruct run on it; anything that needs
log p(x|z) (score, evaluate, the likelihood-based detector rules) or a draw from p(x|z) is one clear error."""

from __future__ import annotations

import numpy as np

from ...core.config import no_scores
from ...core.errors import VaeEngineError
from .base import Likelihood


class NoLikelihood(Likelihood):
    name = "none"
    unit_interval = True  # its items are images in [0, 1] (uint8 / 255); the graph maps them to the model's range

    def mean(self, params):
        return np.asarray(params, np.float32)

    def mean_torch(self, params):
        return params

    def mean_onnx(self, params, out, dim):
        return []  # the decoder's output is the mean: nothing to append

    def _refuse(self, *args, **kwargs):
        raise VaeEngineError(no_scores(True, False))

    log_prob = log_prob_numpy = sample = _refuse
