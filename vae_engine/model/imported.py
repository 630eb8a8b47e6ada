"""Autoencoders brought in from outside as the engine runs them: the networks of diffusers' AutoencoderKL or a
user's own modules, wrapped in the engine's conventions (`config.ImportSpec`): items flattened to D values in
[0, 1], latents flattened to L values and scaled as the model declares, log-variances bounded like the trainer's.
The same wrappers run on the torch backend and are what export traces into the two graphs, so every path computes
one function."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.config import LOGVAR_MAX, LOGVAR_MIN, ModelConfig
from ..core.errors import VaeEngineError, missing_dependency
from . import likelihoods


class Encoder(nn.Module):
    """x (B, D) in [0, 1] -> (mu, logvar), each (B, L): `net` maps (B, *input_shape) in the model's input range to
    the posterior's (mean, log-variance) (B, *latent_shape); the latents leave scaled (`ImportSpec`)."""

    def __init__(self, net: nn.Module, cfg: ModelConfig):
        super().__init__()
        spec = cfg.import_spec
        self.net, self.shape = net, tuple(cfg.input_shape)
        self.lo, self.span = (spec.input_range[0], spec.input_range[1] - spec.input_range[0]) if spec.input_range \
            else (0.0, 1.0)
        self.shift, self.scale = spec.shift_factor, spec.scaling_factor
        self.log_scale2 = 2.0 * math.log(spec.scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(x.shape[0], *self.shape)
        if (self.lo, self.span) != (0.0, 1.0):
            x = x * self.span + self.lo
        mu, logvar = self.net(x)
        mu = (mu.float() - self.shift) * self.scale if (self.shift, self.scale) != (0.0, 1.0) else mu.float()
        logvar = logvar.float() + self.log_scale2 if self.log_scale2 else logvar.float()
        return mu.flatten(1), logvar.flatten(1).clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z (B, L) scaled latents -> the likelihood's parameters (B, P*D), or for a model without likelihood E[x|z]
    (B, D) in [0, 1] (the decoder's `output_range` mapped there and clipped)."""

    def __init__(self, net: nn.Module, cfg: ModelConfig):
        super().__init__()
        spec = cfg.import_spec
        self.net, self.shape, self.likelihood = net, tuple(cfg.latent_shape), likelihoods.get(cfg.likelihood)
        self.shift, self.scale = spec.shift_factor, spec.scaling_factor
        self.out_range = spec.output_range

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(z.shape[0], *self.shape)
        if (self.shift, self.scale) != (0.0, 1.0):
            z = z / self.scale + self.shift
        out = self.net(z).float().flatten(1)
        if self.out_range is not None:
            lo, hi = self.out_range
            out = ((out - lo) / (hi - lo)).clamp(0.0, 1.0)
        return out


class ImportedVAE(nn.Module):
    """An imported model in the shape of the trainer's `VAE` (`encoder`, `decoder`, `likelihood`, `cfg`), over the
    module whose weights model.safetensors holds (`source`)."""

    def __init__(self, cfg: ModelConfig, source: nn.Module, encoder_net: nn.Module, decoder_net: nn.Module):
        super().__init__()
        self.cfg, self.source = cfg, source
        self.likelihood = likelihoods.get(cfg.likelihood)
        self.encoder, self.decoder = Encoder(encoder_net, cfg), Decoder(decoder_net, cfg)


class _DiffusersEncoder(nn.Module):
    """AutoencoderKL's posterior: (mean, logvar) of `encode(x).latent_dist` (diffusers bounds logvar to [-30, 20])."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar


class _DiffusersDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def check_autoencoder_kl(config: dict[str, Any]) -> None:
    """The sizes of an AutoencoderKL config checked before anything is allocated (config.json is user input: a
    crafted width must be an error line, not an out-of-memory kill): its convolutions' weights, about
    9 c^2 (4 layers + 2) per block of c channels, within the project's MAX_PARAMS."""
    from ..core.config import MAX_PARAMS, check_int

    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise VaeEngineError(f"the imported config describes a {config.get('_class_name')!r}, not an AutoencoderKL")
    channels = config.get("block_out_channels", (64,))
    if not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= 8:
        raise VaeEngineError(f"block_out_channels must list 1 to 8 sizes, got {channels!r}")
    for c in channels:
        check_int("a block's channels", c, 1, 4096)
    layers = check_int("layers_per_block", config.get("layers_per_block", 1), 1, 16)
    for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
        if name in config:
            check_int(name, config[name], 1, 4096)
    params = sum(9 * c * c * (4 * layers + 2) for c in channels)
    if params > MAX_PARAMS:
        raise VaeEngineError(f"this AutoencoderKL has about {params:,} weights, over the limit of {MAX_PARAMS:,}")


def autoencoder_kl(config: dict[str, Any]) -> nn.Module:
    """diffusers' AutoencoderKL built from its config (random weights, eval mode): no network, no remote code."""
    check_autoencoder_kl(config)
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise (missing_dependency(exc, "a diffusers AutoencoderKL") or exc) from None
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        return AutoencoderKL.from_config(config).eval()
    except Exception as exc:  # diffusers raises many types for a config it cannot build
        raise VaeEngineError(f"diffusers cannot build an AutoencoderKL from this config ({exc})") from None


def wrap_diffusers(cfg: ModelConfig, vae: nn.Module) -> ImportedVAE:
    """The engine's model over an AutoencoderKL whose weights are loaded."""
    return ImportedVAE(cfg, vae, _DiffusersEncoder(vae), _DiffusersDecoder(vae)).eval()


def source_module(cfg: ModelConfig) -> nn.Module:
    """The module model.safetensors holds the weights of, rebuilt from config.json (weights not loaded yet; then
    `wrap_diffusers`): only diffusers' AutoencoderKL can be rebuilt, a user's modules cannot."""
    spec = cfg.import_spec
    if spec.source == "diffusers":
        return autoencoder_kl(spec.config)
    raise VaeEngineError("this model was imported from your own modules: it runs on its exported graphs (--backend "
                         "onnxruntime or openvino); PyTorch cannot rebuild modules it has no code for")
