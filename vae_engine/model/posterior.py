"""The posterior q(z|x) = N(mu, diag(exp(logvar))) as an object (as torch.distributions and diffusers'
DiagonalGaussianDistribution): mean, sample by reparameterization, log-density, KL to N(0, I); and the Gaussian
densities every torch estimator and prior uses, summed over latent dims. The engine's twins are the Numba kernels
(`kernels.reparameterize`, `kernels.gaussian_kl`, the fused log-weights)."""

from __future__ import annotations

import torch

from ..core.config import LOG_2PI


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)), K&W 2013 appendix B."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over latent dims."""
    return -0.5 * torch.sum(LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar), dim=-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over latent dims."""
    return -0.5 * torch.sum(LOG_2PI + z.pow(2), dim=-1)


class DiagonalGaussian:
    """q(z|x) for a batch: mu and logvar (B, L). Samples come in the one eps layout of the project, (B, K, L): K
    samples per input (the counter streams' and the Numba kernels' layout); a single sample may also be (B, L).
    Deterministic unless sampled with explicit eps."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor):
        self.mu, self.logvar = mu, logvar

    @property
    def mean(self) -> torch.Tensor:
        """The posterior mean (also its mode): mu (B, L)."""
        return self.mu

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def _per_sample(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """t (B, L) shaped to meet z: (B, 1, L) against samples (B, K, L). A sample-major (K, B, L) tensor is
        refused rather than broadcast into a silently wrong (B, B, L)."""
        if z.dim() == t.dim():
            return t
        if z.dim() == t.dim() + 1 and z.shape[:-2] == t.shape[:-1] and z.shape[-1] == t.shape[-1]:
            return t.unsqueeze(-2)
        raise ValueError(f"samples of shape {tuple(z.shape)} do not fit a posterior of shape {tuple(t.shape)}: "
                         "eps and z are (B, K, L)")

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps (K&W 2013, eq. 4), for eps (B, K, L) or (B, L)."""
        return self._per_sample(self.mu, eps) + self._per_sample(self.std, eps) * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over latent dims: z (B, K, L) -> (B, K), or (B, L) -> (B,)."""
        return gaussian_log_prob(z, self._per_sample(self.mu, z), self._per_sample(self.logvar, z))

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per input (B,), analytic."""
        return gaussian_kl(self.mu, self.logvar)

    def detach(self) -> DiagonalGaussian:
        """The same distribution with its parameters as constants (DReG's log q: z drawn from the undetached one
        still carries the gradient of the sampling path)."""
        return DiagonalGaussian(self.mu.detach(), self.logvar.detach())
