"""The VAE itself: networks, the posterior, likelihoods (one module each), priors, and the ELBO/IWAE estimators
written once in PyTorch (`estimators`) and once as Numba kernels with NumPy twins (`kernels`)."""

from ..core.lazy import exports

_NAMES = {"VAE": "networks", "Encoder": "networks", "Decoder": "networks", "DiagonalGaussian": "posterior",
          "gaussian_kl": "posterior", "gaussian_log_prob": "posterior", "standard_normal_log_prob": "posterior",
          "elbo": "estimators", "log_weights": "estimators", "iwae_bound": "estimators", "dreg_bound": "estimators",
          "reference_scores": "estimators", "reference_nelbo": "estimators"}
__getattr__ = exports(__name__, _NAMES)
__all__ = list(_NAMES)
