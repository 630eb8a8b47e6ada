"""Likelihoods p(x|z): each defined once, with its PyTorch form (training), its Numba row kernel (the engine's
importance weights) and its NumPy reference twin (tests), side by side in one module per likelihood.

The decoder returns `n_params` values per feature, parameter-major: (..., n_params * D). Every log-probability is
summed over features and is in the units of the raw data (preprocessing lives inside the model, so the
change-of-variables term of a standardization is part of the decoder's output).
"""

from __future__ import annotations

from ...core import config
from .base import Likelihood
from .bernoulli import Bernoulli
from .continuous_bernoulli import ContinuousBernoulli
from .gaussian import Gaussian
from .none import NoLikelihood

LIKELIHOODS: dict[str, Likelihood] = {lk.name: lk for lk in (Bernoulli(), ContinuousBernoulli(), Gaussian(),
                                                               NoLikelihood())}
assert tuple(LIKELIHOODS) == config.LIKELIHOODS  # config lists the names without importing Numba


def get(name: str) -> Likelihood:
    """The likelihood of that name."""
    from ...core.errors import VaeEngineError

    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise VaeEngineError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}") from None


__all__ = ["Likelihood", "LIKELIHOODS", "get", "Bernoulli", "ContinuousBernoulli", "Gaussian", "NoLikelihood"]
