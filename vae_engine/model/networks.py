"""The VAE: Gaussian encoder q(z|x), the configured likelihood p(x|z), N(0, I) or VampPrior p(z), and its losses."""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import LOGVAR_MAX, LOGVAR_MIN, ModelConfig
from . import likelihoods, priors
from .posterior import DiagonalGaussian

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus}
DEC_LOGVAR_MIN, DEC_LOGVAR_MAX = -9.0, 3.0  # Gaussian decoder, standardized units: std between 0.011 and 4.5
STD_FLOOR = 1e-3  # standardization: a feature's std is at least this fraction of the largest one


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _conv_sizes(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(C, H, W, H/4, W/4) of a conv model: two stride-2 convolutions halve H and W twice (floor)."""
    c, h, w = cfg.input_shape
    return c, h, w, h // 2 // 2, w // 2 // 2


class _ConvEncoderTrunk(nn.Module):
    """(B, C*H*W) -> (B, 64 * H/4 * W/4): two stride-2 convolutions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        act = _ACTIVATIONS[cfg.activation]
        self.shape = cfg.input_shape
        self.net = nn.Sequential(
            nn.Conv2d(self.shape[0], 32, 4, stride=2, padding=1), act(),  # (B, 32, H/2, W/2)
            nn.Conv2d(32, 64, 4, stride=2, padding=1), act(),  # (B, 64, H/4, W/4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, *self.shape)).flatten(1)


class _ConvDecoderHead(nn.Module):
    """(B, 64 * H/4 * W/4) -> (B, P*C*H*W), parameter-major: two stride-2 transposed convolutions whose
    output_padding restores odd sizes exactly (out = 2 * in + output_padding)."""

    def __init__(self, cfg: ModelConfig, n_params: int):
        super().__init__()
        c, h, w, h4, w4 = _conv_sizes(cfg)
        self.start = (64, h4, w4)
        h2, w2 = h // 2, w // 2
        self.net = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1, output_padding=(h2 - 2 * h4, w2 - 2 * w4)),
            _ACTIVATIONS[cfg.activation](),  # (B, 32, H/2, W/2)
            nn.ConvTranspose2d(32, n_params * c, 4, stride=2, padding=1, output_padding=(h - 2 * h2, w - 2 * w2)),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.view(-1, *self.start)).flatten(1)


class _ResBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): a pre-activation residual block at constant shape (He et al. 2016)."""

    def __init__(self, channels: int, activation: str):
        super().__init__()
        act = _ACTIVATIONS[activation]
        self.net = nn.Sequential(act(), nn.Conv2d(channels, channels, 3, padding=1),
                                 act(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class _ResNetEncoderTrunk(nn.Module):
    """(B, C*H*W) -> (B, 64 * H/4 * W/4): the conv trunk's two stride-2 convolutions, each followed by a
    residual block, after a 3x3 stem with a residual block at full resolution."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        act = cfg.activation
        self.shape = cfg.input_shape
        self.net = nn.Sequential(
            nn.Conv2d(self.shape[0], 32, 3, padding=1), _ResBlock(32, act),  # (B, 32, H, W)
            nn.Conv2d(32, 64, 4, stride=2, padding=1), _ResBlock(64, act),  # (B, 64, H/2, W/2)
            nn.Conv2d(64, 64, 4, stride=2, padding=1), _ResBlock(64, act), _ACTIVATIONS[act](),  # (B, 64, H/4, W/4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, *self.shape)).flatten(1)


class _ResNetDecoderHead(nn.Module):
    """(B, 64 * H/4 * W/4) -> (B, P*C*H*W), parameter-major: the mirror of the ResNet trunk, transposed
    convolutions whose output_padding restores odd sizes exactly, a residual block after each."""

    def __init__(self, cfg: ModelConfig, n_params: int):
        super().__init__()
        act = cfg.activation
        c, h, w, h4, w4 = _conv_sizes(cfg)
        self.start = (64, h4, w4)
        h2, w2 = h // 2, w // 2
        self.net = nn.Sequential(
            _ResBlock(64, act),
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1, output_padding=(h2 - 2 * h4, w2 - 2 * w4)),
            _ResBlock(64, act),  # (B, 64, H/2, W/2)
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1, output_padding=(h - 2 * h2, w - 2 * w2)),
            _ResBlock(32, act), _ACTIVATIONS[act](),  # (B, 32, H, W)
            nn.Conv2d(32, n_params * c, 3, padding=1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.view(-1, *self.start)).flatten(1)


_TRUNKS = {"conv": (_ConvEncoderTrunk, _ConvDecoderHead), "resnet": (_ResNetEncoderTrunk, _ResNetDecoderHead)}


class Encoder(nn.Module):
    """x (B, D) raw features -> (mu, logvar), each (B, latent_dim); standardizes inside when configured."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.latent_dim = cfg.latent_dim
        if cfg.standardize:  # set from the training split by `VAE.set_standardization`
            self.register_buffer("shift", torch.zeros(cfg.input_dim))
            self.register_buffer("scale", torch.ones(cfg.input_dim))
        self.standardize = cfg.standardize
        if cfg.arch == "mlp":
            self.net = _mlp([cfg.input_dim, *cfg.hidden, 2 * cfg.latent_dim], cfg.activation)
        else:
            act = _ACTIVATIONS[cfg.activation]
            _, _, _, h4, w4 = _conv_sizes(cfg)
            trunk = [_TRUNKS[cfg.arch][0](cfg)]
            sizes = [64 * h4 * w4, *cfg.hidden]
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
                trunk += [nn.Linear(n_in, n_out), act()]
            self.net = nn.Sequential(*trunk, nn.Linear(sizes[-1], 2 * cfg.latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.standardize:
            x = (x - self.shift) / self.scale
        mu, logvar = self.net(x).float().chunk(2, dim=-1)  # fp32 out of a bf16 autocast network
        # bounded so exp(logvar) and exp(-logvar) stay finite in float32 for any input
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z (B, latent_dim) -> the likelihood's parameters (B, P*D) in raw units (see likelihoods/)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.likelihood = likelihoods.get(cfg.likelihood)
        n_params = self.likelihood.n_params
        hidden = list(reversed(cfg.hidden))
        self.standardize = cfg.standardize
        if cfg.standardize:
            self.register_buffer("shift", torch.zeros(cfg.input_dim))
            self.register_buffer("scale", torch.ones(cfg.input_dim))
        if cfg.arch == "mlp":
            self.net = _mlp([cfg.latent_dim, *hidden, n_params * cfg.input_dim], cfg.activation)
        else:
            act = _ACTIVATIONS[cfg.activation]
            _, _, _, h4, w4 = _conv_sizes(cfg)
            sizes = [cfg.latent_dim, *hidden, 64 * h4 * w4]
            layers: list[nn.Module] = []
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(n_in, n_out), act()]
            self.net = nn.Sequential(*layers, _TRUNKS[cfg.arch][1](cfg, n_params))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z).float()  # the likelihood's maths in fp32 even when the network runs in bf16 autocast
        if self.likelihood.n_params == 1:
            return out
        mean, pre = out.chunk(2, dim=-1)
        # Gaussian: a log-variance softly bounded in [DEC_LOGVAR_MIN, DEC_LOGVAR_MAX] (standardized units), so
        # the density can neither collapse onto a constant feature nor explode; then raw units:
        # mean * std + shift and logvar + 2 log std (the change of variables of the standardization)
        logvar = DEC_LOGVAR_MIN + (DEC_LOGVAR_MAX - DEC_LOGVAR_MIN) * torch.sigmoid(pre)
        if self.standardize:
            mean = mean * self.scale + self.shift
            logvar = logvar + 2.0 * torch.log(self.scale)
        return torch.cat([mean, logvar], dim=-1)


class VAE(nn.Module):
    """Kingma & Welling (2013) VAE: diagonal Gaussian posterior, the configured prior and likelihood."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.likelihood = likelihoods.get(cfg.likelihood)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.prior = priors.make(cfg, self.encoder)  # p(z); a VampPrior holds the pseudo-inputs

    @torch.no_grad()
    def init_pseudo_inputs(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Start a VampPrior's pseudo-inputs at distinct training items x (N, D), drawn by `generator`."""
        if priors.kind(self.cfg).mixture:
            c = self.cfg.pseudo_inputs
            index = torch.randperm(len(x), generator=generator)[:c]
            self.prior.pseudo_inputs.copy_(x[index.repeat(-(-c // len(index)))[:c]])

    @torch.no_grad()
    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-feature shift and scale measured on the training split (std floored so no feature divides by 0)."""
        std = torch.clamp(std, min=STD_FLOOR * max(float(std.max()), 1e-12))
        for part in (self.encoder, self.decoder):
            part.shift.copy_(mean)
            part.scale.copy_(std)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters: (mu, logvar), each (B, D)."""
        return self.encoder(x)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) as a distribution object (mean, sample, log_prob, kl)."""
        return DiagonalGaussian(*self.encoder(x))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps (K&W 2013, eq. 4), for eps (B, K, L) or (B, L)."""
        return DiagonalGaussian(mu, logvar).sample(eps)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters of p(x|z), shape (..., P*D) for z (..., latent_dim)."""
        return self.decoder(z.reshape(-1, z.shape[-1])).view(*z.shape[:-1], -1)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, mu, logvar) for one reparameterized sample per input."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, eps)), mu, logvar
