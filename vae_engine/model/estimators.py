"""The ELBO and IWAE estimators, written once in PyTorch: training (ELBO, IWAE, DReG), the torch backend's
on-device log-weights, export's validation and the reference scores every other path is compared with (below).
The engine's twins are the Numba kernels of `kernels` (same formulas, same counter-based eps streams).

Shapes: x (B, D); eps (B, K, L) for K samples per input (the one eps layout: the counter streams' and the
kernels'); per-input values (B,), log-weights (B, K).

The reference scores: test-set -ELBO and importance-weighted NLL (Burda et al. 2015) over NumPy items, with
binarization and eps from the counter-based streams of `rng` keyed by (seed, item index), so any backend that
uses the same streams must reproduce these numbers exactly up to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core import rng
from ..core.config import SCORE_ROWS
from .evaluation import evaluate, summarize  # noqa: F401 - the test-set loop, torch-free, re-exported
from .networks import VAE
from .posterior import DiagonalGaussian


def log_weight(likelihood, prior_log_prob, x: torch.Tensor, params: torch.Tensor, z: torch.Tensor,
               q: DiagonalGaussian) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x): the importance log-weight, per sample and input."""
    return likelihood.log_prob(x, params) + prior_log_prob(z) - q.log_prob(z)


def elbo(model: VAE, x: torch.Tensor, eps: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
    """ELBO per input: E_q[log p(x|z)] - KL(q||p), K&W 2013 eq. 10, over the K samples of eps (B, K, L); the KL
    analytic for N(0, I), estimated with the same samples for a VampPrior."""
    q = model.posterior(x)
    z = q.sample(eps)  # (B, K, L)
    params = model.decode(z)  # (B, K, P*D)
    return model.likelihood.log_prob(x[:, None], params).mean(-1) - kl_weight * model.prior.kl(q, z)


def log_weights(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Importance log-weights log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (B, K), for eps (B, K, L)."""
    return log_weights_and_z(model, x, eps)[0]


def log_weights_and_z(model: VAE, x: torch.Tensor, eps: torch.Tensor, detach_q: bool = False):
    """(log-weights (B, K), samples z (B, K, L)). detach_q: q's parameters enter log q as constants (z still
    depends on them), as DReG needs."""
    q = model.posterior(x)
    z = q.sample(eps)
    q_in_log_q = q.detach() if detach_q else q
    return log_weight(model.likelihood, model.prior.log_prob, x[:, None], model.decode(z), z, q_in_log_q), z


def dreg_bound(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The IWAE bound per input (B,) with doubly reparameterized gradients (Tucker et al. 2018, eq. 5): its value
    is `iwae_bound`'s; its gradient gives the decoder and prior sum_k w~_k d log w_k and the encoder
    sum_k w~_k^2 (d log w_k / d z_k) dz_k (w~ the normalized weights; no score-function term).

    One backward pass: log q takes its parameters as constants, the surrogate sum_k w~_k log w_k gives the
    decoder its gradient, and a hook on z scales the gradient that reaches the encoder through z by a further
    w~_k. z depends on the encoder alone, so the hook touches nothing else (a VampPrior's pseudo-inputs reach the
    encoder through log p, not through z)."""
    log_w, z = log_weights_and_z(model, x, eps, detach_q=True)
    w = torch.softmax(log_w.detach(), dim=-1)  # (B, K)
    if z.requires_grad:
        z.register_hook(lambda grad: grad * w.unsqueeze(-1))
    surrogate = (w * log_w).sum(-1)
    return iwae_bound(log_w.detach()) + surrogate - surrogate.detach()


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_K = log (1/K) sum_k w_k via log-sum-exp (Burda et al. 2015, eq. 8); log_w (B, K) -> (B,)."""
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


# ---- the reference scores over NumPy items (the counter-based streams) ----


@torch.no_grad()
def reference_scores(model: VAE, x: np.ndarray, start: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item (-ELBO, -log p(x) IWAE estimate with k samples), each (n,) float64, for x (n, D) in model units.

    `start` is the global index of x[0]: it keys the eps streams, so results do not depend on chunking.
    -ELBO uses the analytic KL and the first eps of a k=1 stream; the IWAE estimate its own k-sample stream.
    """
    device = _device(model)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)

    def block_log_sum(i: int, j: int, eps: np.ndarray) -> np.ndarray:  # (b,) over the block's samples
        log_w = log_weights(model, xt[i:j], torch.from_numpy(eps).to(device)).double()  # (b, K')
        return torch.logsumexp(log_w, dim=-1).cpu().numpy()

    # the engine's blocking and streams
    log_sum = rng.iwae_log_sums(rng.Streams.contiguous(seed, start, len(x)), k, model.cfg.latent_dim, SCORE_ROWS,
                                block_log_sum)
    return reference_nelbo(model, x, start, seed), -(log_sum - np.log(k))


@torch.no_grad()
def reference_nelbo(model: VAE, x: np.ndarray, start: int, seed: int) -> np.ndarray:
    """Per-item -ELBO (n,) float64: the analytic KL and one eps per item from the k=1 stream (seed, index).

    The one estimator of the test -ELBO: `evaluate`, `export` and the per-epoch metrics all use it."""
    device = _device(model)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    eps1 = torch.from_numpy(rng.normal_eps(seed, start, len(x), 1, model.cfg.latent_dim)).to(device)  # (n, 1, L)
    return -elbo(model, xt, eps1).double().cpu().numpy()


def _device(model: VAE) -> torch.device:
    """Where the model's weights are (the trainer checks its test numbers on the device it trains on)."""
    return next(model.parameters()).device
