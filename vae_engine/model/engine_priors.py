"""The priors p(z) as the engine runs them: NumPy arrays, a Numba log-density kernel with its NumPy twin, and
sampling from the counter streams. No torch here: an inference install runs them without PyTorch. Their PyTorch
forms (training, the reference) are in `priors`, which draws the same numbers (`component_index`).

The VampPrior (Tomczak & Welling 2018, eq. 9) is stored in the model folder as the mixture it stands for (each
component's mean and log-variance, `prior.safetensors`), so the engine never runs the encoder on the
pseudo-inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import rng
from ..core.config import LOG_2PI
from ..core.fastmath import PARALLEL_MIN, jit, numba
from ..core.fastmath import exp as _exp
from . import kernels


@dataclass(frozen=True)
class PriorKind:
    """What the rest of the project asks of a prior, by its config name (`kind(cfg)`, chosen once): how figures
    name it, and whether it is a mixture over learned pseudo-inputs (they pass through the encoder at every training
    step; the model folder stores the mixture, `prior.safetensors`; its log-density costs C x L multiply-adds a
    sample, where N(0, I)'s is fused into the log-weights)."""

    name: str
    label: str
    mixture: bool

    def encoder_rows(self, cfg: Any) -> int:
        """Extra encoder rows of a training step (the pseudo-inputs)."""
        return cfg.pseudo_inputs if self.mixture else 0

    def log_prob_macs(self, cfg: Any) -> int:
        """Multiply-adds of log p(z) for one sample z (the mixture kernel's C x L)."""
        return cfg.pseudo_inputs * cfg.latent_dim if self.mixture else 0


KINDS = {"normal": PriorKind("normal", "N(0, I)", False), "vamp": PriorKind("vamp", "VampPrior", True),
         "none": PriorKind("none", "no prior", False)}


def kind(cfg: Any) -> PriorKind:
    """The prior a ModelConfig names (`config.PRIORS` lists the same names)."""
    return KINDS[cfg.prior]


def component_index(seed: int, start: int, n: int, count: int) -> np.ndarray:
    """The mixture component (n,) int64 of items start..start+n-1 of seed: uniform over `count`, from each item's
    prior stream (the same for the PyTorch and the engine form)."""
    return np.minimum((rng.uniforms(seed, rng.PRIOR_STREAM, start, n) * count).astype(np.int64), count - 1)



def _make_mixture_kernel(parallel: bool):
    def kernel(z, mu_t, inv_var_t, norm, out):
        """out[n] = log (1/C) sum_c exp(norm[c] - 1/2 sum_l (z[n, l] - mu[c, l])^2 inv_var[c, l]), max-shifted; the
        direct form, so no terms cancel. The tables are component-major transposed, mu_t and inv_var_t (L, C):
        the inner loops run over the C components of one latent dimension, contiguous, so they vectorize without
        a horizontal sum per component (2.3x the component-by-component loop: 16,384 rows, 500 components, 50
        dimensions in 30 ms against 70, 2-core AVX2 EPYC)."""
        n, d = z.shape
        c = mu_t.shape[1]
        log_c = math.log(c)
        for i in numba.prange(n):
            acc = np.zeros(c, np.float32)
            for l in range(d):  # noqa: E741
                zl = z[i, l]
                for j in range(c):
                    diff = zl - mu_t[l, j]
                    acc[j] += diff * diff * inv_var_t[l, j]
            top = np.float32(-np.inf)
            for j in range(c):
                acc[j] = norm[j] - np.float32(0.5) * acc[j]
                top = max(top, acc[j])
            total = np.float32(0.0)
            for j in range(c):
                total += _exp(acc[j] - top)
            out[i] = top + math.log(total) - log_c
    return jit(kernel, parallel, fastmath=True)


_MIXTURE = (_make_mixture_kernel(False), _make_mixture_kernel(True))


class NormalPrior:
    """N(0, I) as the engine runs it."""

    standard = True  # the log-weights kernel fuses log N(z; 0, I) itself, and the KL is analytic

    def __init__(self, latent_dim: int):
        self.latent_dim = latent_dim

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z) per row (N,) float64 for z (N, L)."""
        z = np.asarray(z, np.float64)
        return -0.5 * np.sum(LOG_2PI + z * z, axis=-1)

    def kl(self, mu: np.ndarray, logvar: np.ndarray, z: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """KL(q || p) per row (B,), analytic (K&W 2013 appendix B); z and eps are not used."""
        return kernels.gaussian_kl(mu, logvar)

    def sample(self, seed: int, start: int, n: int) -> np.ndarray:
        """z (n, L) for items start..start+n-1 of seed: the eps stream's first sample."""
        return rng.normal_eps(seed, start, n, 1, self.latent_dim)[:, 0]


class NoPrior:
    """An imported model that declares no p(z) (its latents are scaled for a diffusion model, say): sampling and
    every likelihood score are one clear error; encode, decode and reconstruct need no prior."""

    standard = False

    def __init__(self, latent_dim: int):
        self.latent_dim = latent_dim

    def _refuse(self, *args, **kwargs):
        from ..core.config import no_scores
        from ..core.errors import VaeEngineError

        raise VaeEngineError(no_scores(False, True))

    log_prob = kl = sample = _refuse


class MixturePrior:
    """The VampPrior's mixture as the engine runs it: C diagonal Gaussians (mu, logvar), each (C, L) float32."""

    standard = False

    def __init__(self, mu: np.ndarray, logvar: np.ndarray):
        self.mu = np.ascontiguousarray(mu, np.float32)
        self.logvar = np.ascontiguousarray(logvar, np.float32)
        self.latent_dim = self.mu.shape[1]
        self._mu_t = np.ascontiguousarray(self.mu.T)  # (L, C): the kernel's component-major layout
        self._inv_var_t = np.ascontiguousarray(np.exp(-self.logvar).T, np.float32)
        self._norm = (-0.5 * (self.logvar.astype(np.float64).sum(1) + self.latent_dim * LOG_2PI)).astype(np.float32)

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z) per row (N,) float32 for z (N, L), one Numba pass (no (N, C, L) temporaries)."""
        z = np.ascontiguousarray(z, np.float32)
        out = np.empty(len(z), np.float32)
        _MIXTURE[z.size * len(self.mu) >= PARALLEL_MIN](z, self._mu_t, self._inv_var_t, self._norm, out)
        return out

    def log_prob_numpy(self, z: np.ndarray) -> np.ndarray:
        """NumPy twin of `log_prob` in float64: the textbook density of each component, then log-sum-exp."""
        z = np.asarray(z, np.float64)[:, None, :]
        mu, logvar = self.mu.astype(np.float64), self.logvar.astype(np.float64)
        log_n = -0.5 * np.sum(LOG_2PI + logvar + (z - mu) ** 2 * np.exp(-logvar), axis=-1)  # (N, C)
        top = log_n.max(-1, keepdims=True)
        return (top + np.log(np.mean(np.exp(log_n - top), axis=-1, keepdims=True)))[:, 0]

    def kl(self, mu: np.ndarray, logvar: np.ndarray, z: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """log q(z|x) - log p(z) per row (B,) at one sample z = mu + sigma eps: the KL's one-sample estimate
        ((z - mu)^2 / sigma^2 is eps^2 exactly)."""
        log_q = -0.5 * np.sum(LOG_2PI + logvar.astype(np.float64) + eps.astype(np.float64) ** 2, axis=-1)
        return log_q - self.log_prob(z)

    def sample(self, seed: int, start: int, n: int) -> np.ndarray:
        """z (n, L) for items start..start+n-1 of seed: a component from the item's prior stream, then that
        component's mean plus its sigma times the item's first eps."""
        c = component_index(seed, start, n, len(self.mu))
        eps = rng.normal_eps(seed, start, n, 1, self.latent_dim)[:, 0]
        return (self.mu[c] + np.exp(0.5 * self.logvar[c]) * eps).astype(np.float32)
