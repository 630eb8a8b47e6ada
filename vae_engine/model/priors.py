"""Priors p(z): the standard normal and the VampPrior, each defined once with its PyTorch form (training and the
reference), what the engine runs (a Numba log-density kernel with its NumPy twin, and sampling from the counter
streams), side by side.

The VampPrior (Tomczak & Welling 2018, eq. 9) is the encoder's own posterior averaged over C learned
pseudo-inputs u_c: p(z) = 1/C sum_c q(z | u_c). Training learns the u_c with everything else; the model folder
stores the mixture it stands for (each component's mean and log-variance, `prior.safetensors`), so the engine
never runs the encoder on the pseudo-inputs and the exported graphs stay the two plain networks.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import nn

from ..core import rng
from ..core.config import LOG_2PI, ModelConfig
from ..core.fastmath import PARALLEL_MIN, jit
from ..core.fastmath import exp as _exp
from . import kernels
from .posterior import DiagonalGaussian, standard_normal_log_prob


def mixture_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log (1/C) sum_c N(z; mu_c, diag(exp(logvar_c))) for z (..., L) and components (C, L) -> (...).

    Each component's log-density is expanded into one matrix product plus a constant,
    log N(z; m, s^2) = [z^2, z] @ [-a/2, m a]^T - 1/2 (sum_l m^2 a + sum_l logvar + L log 2 pi), a = exp(-logvar),
    so a batch costs one GEMM (inner size 2L) instead of a (..., C, L) tensor and its gradient. In fp32 even under
    autocast: the log-sum-exp over C and the cancelling terms need its mantissa.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, mu, logvar = z.float(), mu.float(), logvar.float()
        flat = z.reshape(-1, z.shape[-1])  # (N, L)
        inv = torch.exp(-logvar)  # (C, L)
        weights = torch.cat([-0.5 * inv, mu * inv], dim=-1)  # (C, 2L)
        const = -0.5 * ((mu * mu * inv).sum(-1) + logvar.sum(-1) + z.shape[-1] * LOG_2PI)  # (C,)
        log_n = torch.addmm(const, torch.cat([flat * flat, flat], dim=-1), weights.T)  # (N, C)
        return (torch.logsumexp(log_n, dim=-1) - math.log(mu.shape[0])).view(z.shape[:-1])


class StandardNormal(nn.Module):
    """p(z) = N(0, I): the KL of a Gaussian posterior is analytic."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z)

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per input (B,); analytic here, so the samples z (B, K, L) are not used."""
        return q.kl()

    def sample(self, n: int, latent_dim: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        """z (n, L) ~ N(0, I) for items start..start+n-1 of seed: the engine's draw (`NormalPrior.sample`)."""
        return torch.from_numpy(rng.normal_eps(seed, start, n, 1, latent_dim)[:, 0])

    def components(self) -> None:
        return None


class VampPrior(nn.Module):
    """p(z) = 1/C sum_c q(z | u_c), the encoder's posterior on C learned pseudo-inputs u_c (Tomczak & Welling
    2018). The pseudo-inputs are in the encoder's input units (raw data); `VAE.init_pseudo_inputs` starts them
    at training items."""

    def __init__(self, cfg: ModelConfig, encoder: nn.Module):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.rand(cfg.pseudo_inputs, cfg.input_dim))  # (C, D)
        self._encoder = (encoder,)  # a tuple, so not a submodule: its weights are the VAE's encoder's

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's (mu, logvar), each (C, L): the encoder on the pseudo-inputs."""
        return self._encoder[0](self.pseudo_inputs)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, *self.components())

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)) per input (B,), estimated with q's samples z (B, K, L): no closed form for a
        mixture."""
        return (q.log_prob(z) - self.log_prob(z)).mean(-1)

    def sample(self, n: int, latent_dim: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        """z (n, L) for items start..start+n-1 of seed, from the counter streams the engine's `MixturePrior.sample`
        reads: a component from the item's prior stream, then its mean plus its sigma times the item's first eps."""
        mu, logvar = self.components()
        c = torch.from_numpy(_components(seed, start, n, len(mu))).to(mu.device)
        eps = torch.from_numpy(rng.normal_eps(seed, start, n, 1, latent_dim)[:, 0]).to(mu.device)
        return mu[c] + torch.exp(0.5 * logvar[c]) * eps


def _components(seed: int, start: int, n: int, count: int) -> np.ndarray:
    """The mixture component (n,) int64 of items start..start+n-1 of seed: uniform over `count`, from each item's
    prior stream (the same for the PyTorch and the engine form)."""
    return np.minimum((rng.uniforms(seed, rng.PRIOR_STREAM, start, n) * count).astype(np.int64), count - 1)


def make(cfg: ModelConfig, encoder: nn.Module) -> nn.Module:
    """The PyTorch prior a config names."""
    return VampPrior(cfg, encoder) if cfg.prior == "vamp" else StandardNormal()


# ---- what the engine runs: NumPy arrays, Numba kernels, counter streams ----


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
        c = _components(seed, start, n, len(self.mu))
        eps = rng.normal_eps(seed, start, n, 1, self.latent_dim)[:, 0]
        return (self.mu[c] + np.exp(0.5 * self.logvar[c]) * eps).astype(np.float32)
