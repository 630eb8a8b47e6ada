"""The VAE: Gaussian encoder q(z|x), Bernoulli decoder p(x|z) returning logits, N(0, I) prior, and its losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import IMAGE_SHAPE, LOGVAR_MAX, LOGVAR_MIN, ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus}
LOG_2PI = math.log(2.0 * math.pi)


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class _ConvEncoderTrunk(nn.Module):
    """(B, 784) -> (B, 64*7*7): two stride-2 convolutions."""

    def __init__(self, activation: str):
        super().__init__()
        act = _ACTIVATIONS[activation]
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1), act(),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 4, stride=2, padding=1), act(),  # (B, 64, 7, 7)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, *IMAGE_SHAPE)).flatten(1)


class _ConvDecoderHead(nn.Module):
    """(B, 64*7*7) -> (B, 784) logits: two stride-2 transposed convolutions."""

    def __init__(self, activation: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), _ACTIVATIONS[activation](),  # (B, 32, 14, 14)
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.view(-1, 64, 7, 7)).flatten(1)


class Encoder(nn.Module):
    """x (B, 784) in [0, 1] -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        if cfg.arch == "mlp":
            self.net = _mlp([cfg.input_dim, *cfg.hidden, 2 * cfg.latent_dim], cfg.activation)
        else:
            act = _ACTIVATIONS[cfg.activation]
            trunk = [_ConvEncoderTrunk(cfg.activation)]
            sizes = [64 * 7 * 7, *cfg.hidden]
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
                trunk += [nn.Linear(n_in, n_out), act()]
            self.net = nn.Sequential(*trunk, nn.Linear(sizes[-1], 2 * cfg.latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        # bounded so exp(logvar) and exp(-logvar) stay finite in float32 for any input
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z (B, latent_dim) -> Bernoulli logits (B, 784)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = list(reversed(cfg.hidden))
        if cfg.arch == "mlp":
            self.net = _mlp([cfg.latent_dim, *hidden, cfg.input_dim], cfg.activation)
        else:
            act = _ACTIVATIONS[cfg.activation]
            sizes = [cfg.latent_dim, *hidden, 64 * 7 * 7]
            layers: list[nn.Module] = []
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(n_in, n_out), act()]
            self.net = nn.Sequential(*layers, _ConvDecoderHead(cfg.activation))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    """Kingma & Welling (2013) VAE with a diagonal Gaussian posterior and a Bernoulli likelihood."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters: (mu, logvar), each (B, D)."""
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps (K&W 2013, eq. 4); eps (..., B, D) broadcasts over leading sample axes."""
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z), shape (..., 784) for z (..., D)."""
        return self.decoder(z.reshape(-1, z.shape[-1])).view(*z.shape[:-1], -1)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, mu, logvar) for one reparameterized sample per input."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, eps)), mu, logvar


# ---- loss terms: per-input values, shape (B,) or (K, B); summed over pixels / latent dims ----


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|z) = sum_i x_i log s(l_i) + (1 - x_i) log(1 - s(l_i)) = -BCE-with-logits, summed over pixels."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)), K&W 2013 appendix B."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over latent dims."""
    return -0.5 * torch.sum(LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar), dim=-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over latent dims."""
    return -0.5 * torch.sum(LOG_2PI + z.pow(2), dim=-1)


def elbo(model: VAE, x: torch.Tensor, eps: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """ELBO per input with the analytic KL: E_q[log p(x|z)] - KL(q||p), K&W 2013 eq. 10; eps (K, B, D) averaged."""
    mu, logvar = model.encode(x)
    logits = model.decode(model.reparameterize(mu, logvar, eps))  # (K, B, 784)
    return bernoulli_log_prob(x, logits).mean(0) - kl_weight * gaussian_kl(mu, logvar)


def log_weights(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Importance log-weights log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (K, B), for eps (K, B, D)."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, eps)
    return bernoulli_log_prob(x, model.decode(z)) + standard_normal_log_prob(z) - gaussian_log_prob(z, mu, logvar)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_K = log (1/K) sum_k w_k via log-sum-exp (Burda et al. 2015, eq. 8); log_w (K, B) -> (B,)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
