"""The public inference API: a VAE behind any backend, with Numba kernels for sampling and the ELBO/IWAE math.

All randomness comes from the counter-based streams of `rng`, keyed by (seed, global item index): results for a
seed do not depend on batch size, chunking, thread count or backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import checkpoint, kernels, rng
from .backends import Backend, load_backend, set_threads
from .config import INPUT_DIM, SCORE_ROWS, ModelConfig
from .errors import VaeEngineError


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # = 1 / (1 + exp(-l)), without overflow


class Engine:
    """Encode, decode, sample, reconstruct and score with a trained VAE.

    >>> engine = Engine.load("models/mnist-vae")          # doctest: +SKIP
    >>> mu, logvar = engine.encode(x)                     # x (B, 784) float32 in [0, 1]
    """

    def __init__(self, backend: Backend, cfg: ModelConfig, model_dir: Path, threads: int):
        self.backend, self.cfg, self.model_dir, self.threads = backend, cfg, model_dir, threads

    @classmethod
    def load(cls, model_dir: str | Path, backend: str = "auto", device: str = "cpu", threads: int | None = None,
             variant: str = "fp32", spin: bool = False) -> Engine:
        """Load a model directory with the named backend (see `backends.BACKENDS`) and graph variant."""
        model_dir = Path(model_dir)
        cfg = checkpoint.model_config(model_dir)
        threads = set_threads(threads)
        return cls(load_backend(model_dir, backend, variant, threads, device, spin), cfg, model_dir, threads)

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def _check(self, a: np.ndarray, features: int, what: str) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[1] != features:
            raise VaeEngineError(f"{what} must have shape (N, {features}), got {a.shape}")
        return np.ascontiguousarray(a, dtype=np.float32)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q(z|x) parameters (mu, logvar), each (B, D), for x (B, 784) in [0, 1]."""
        return self.backend.encode(self._check(x, INPUT_DIM, "x"))

    def decode(self, z: np.ndarray, logits: bool = False) -> np.ndarray:
        """Pixel probabilities (B, 784) of p(x|z), or the logits with logits=True."""
        out = self.backend.decode(self._check(z, self.latent_dim, "z"))
        return out if logits else _sigmoid(out)

    def sample_posterior(self, mu: np.ndarray, logvar: np.ndarray, k: int = 1, seed: int = 0,
                         start: int = 0) -> np.ndarray:
        """z (B, K, D) ~ q(z|x) by reparameterization, eps from stream (seed, item start+b)."""
        eps = rng.normal_eps(seed, start, len(mu), k, self.latent_dim)
        return kernels.reparameterize(mu, logvar, eps)

    def sample(self, n: int, seed: int = 0, start: int = 0) -> np.ndarray:
        """n images (n, 784) as probabilities, decoded from z ~ N(0, I)."""
        return self.decode(rng.normal_eps(seed, start, n, 1, self.latent_dim)[:, 0])

    def reconstruct(self, x: np.ndarray, sample: bool = False, seed: int = 0, start: int = 0) -> np.ndarray:
        """Decode the posterior mean (or one posterior sample) of each input: probabilities (B, 784)."""
        mu, logvar = self.encode(x)
        z = self.sample_posterior(mu, logvar, 1, seed, start)[:, 0] if sample else mu
        return self.decode(z)

    def elbo(self, x: np.ndarray, seed: int = 0, start: int = 0) -> np.ndarray:
        """ELBO per input (B,): one posterior sample for log p(x|z), analytic KL (K&W 2013, eq. 10)."""
        x = self._check(x, INPUT_DIM, "x")
        mu, logvar = self.backend.encode(x)
        z = self.sample_posterior(mu, logvar, 1, seed, start)[:, 0]
        return kernels.bernoulli_log_prob(x, self.backend.decode(z)) - kernels.gaussian_kl(mu, logvar)

    def log_likelihood(self, x: np.ndarray, k: int = 5000, seed: int = 0, start: int = 0) -> np.ndarray:
        """IWAE estimate of log p(x) per input (B,) with k importance samples (Burda et al. 2015, eq. 8)."""
        x = self._check(x, INPUT_DIM, "x")
        mu, logvar = self.backend.encode(x)
        out = np.empty(len(x))
        per_item = max(1, SCORE_ROWS // k)
        for i in range(0, len(x), per_item):
            j = min(len(x), i + per_item)
            log_w = np.empty((j - i, k), np.float32)
            eps = rng.normal_eps(seed, start + i, j - i, k, self.latent_dim)  # (b, K, D), drawn once
            for s in range(0, k, SCORE_ROWS):  # split K itself when one item's samples exceed SCORE_ROWS
                kk = min(k, s + SCORE_ROWS) - s
                z = kernels.reparameterize(mu[i:j], logvar[i:j], eps[:, s : s + kk])  # (b, K', D)
                logits = self.backend.decode(z.reshape(-1, self.latent_dim)).reshape(j - i, kk, INPUT_DIM)
                log_w[:, s : s + kk] = kernels.log_weights(x[i:j], logits, z, mu[i:j], logvar[i:j])
            out[i:j] = kernels.log_mean_exp(log_w)
        return out

    def scores(self, x: np.ndarray, start: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(-ELBO, -log p(x) estimate) per input: the same quantities as `evaluate.reference_scores`."""
        return -self.elbo(x, seed, start), -self.log_likelihood(x, k, seed, start)
