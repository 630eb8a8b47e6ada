"""Priors p(z): the standard normal and the VampPrior in PyTorch (training and the reference). What the engine runs
(NumPy and Numba, no torch) is in `engine_priors`, re-exported here; both draw the same numbers.

The VampPrior (Tomczak & Welling 2018, eq. 9) is the encoder's own posterior averaged over C learned
pseudo-inputs u_c: p(z) = 1/C sum_c q(z | u_c). Training learns the u_c with everything else; the model folder
stores the mixture it stands for (each component's mean and log-variance, `prior.safetensors`), so the engine
never runs the encoder on the pseudo-inputs and the exported graphs stay the two plain networks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core import rng
from ..core.config import LOG_2PI, ModelConfig
from .engine_priors import MixturePrior, NormalPrior, component_index, kind
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
        c = torch.from_numpy(component_index(seed, start, n, len(mu))).to(mu.device)
        eps = torch.from_numpy(rng.normal_eps(seed, start, n, 1, latent_dim)[:, 0]).to(mu.device)
        return mu[c] + torch.exp(0.5 * logvar[c]) * eps


def make(cfg: ModelConfig, encoder: nn.Module) -> nn.Module:
    """The PyTorch prior a config names."""
    return VampPrior(cfg, encoder) if kind(cfg).mixture else StandardNormal()


__all__ = ["mixture_log_prob", "StandardNormal", "VampPrior", "make", "NormalPrior", "MixturePrior", "component_index"]
