"""Numba kernels for the ELBO/IWAE math, each with a NumPy reference twin (`*_numpy`) that the tests compare.

Layout: per input b and sample k, x (B, P), logits (B, K, P), z and eps (B, K, D), mu/logvar (B, D).
Speed notes: LLVM here has no vector math library (no SVML), so math.exp/log1p in a loop stay scalar and a
naive kernel loses to NumPy; the likelihoods' rows use `core.fastmath`'s vectorizable float32 exp/softplus.
Serial and parallel variants are compiled
once each and chosen by problem size in `_pick` (a parallel launch costs more than it saves on small inputs).
"""

from __future__ import annotations

import math

import numpy as np

from ..core.config import LOG_2PI
from ..core.fastmath import F32, HALF, NUMPY_MAX, PARALLEL_MIN, jit, njit, numba
from .likelihoods import get as _get_likelihood

_LOG_WEIGHTS: dict = {}  # likelihood name -> (serial, parallel) compiled log-weights kernels
_ROWS: dict = {}  # likelihood name -> compiled per-row log-probability kernel


def _make_log_weights(row, name: str, parallel: bool):
    def kernel(x, params, z, mu, logvar, log_pz, out):
        """out[b, k] = log p(x_b|z_bk) + log p(z_bk) - log q(z_bk|x_b), one fused pass, no temporaries. An empty
        log_pz means p = N(0, I), fused here; else log_pz[b, k] is log p(z_bk) (a mixture prior's kernel)."""
        n, k, d = z.shape
        standard = log_pz.shape[0] == 0
        half_d_log_2pi = HALF * d * F32(LOG_2PI)
        for t in numba.prange(n * k):  # over (item, sample): a k=5000 block of three items splits evenly
            b, s = t // k, t % k
            lw = row(x[b], params[b, s])
            if standard:
                for i in range(d):  # log N(z; 0, 1) - log N(z; mu, var): the log(2 pi) terms cancel
                    zi = z[b, s, i]
                    diff = zi - mu[b, i]
                    lw += HALF * (logvar[b, i] + diff * diff * math.exp(-logvar[b, i]) - zi * zi)
            else:
                for i in range(d):  # - log N(z; mu, var), its log(2 pi) terms added once below
                    diff = z[b, s, i] - mu[b, i]
                    lw += HALF * (logvar[b, i] + diff * diff * math.exp(-logvar[b, i]))
                lw += log_pz[b, s] + half_d_log_2pi
            out[b, s] = lw
    kernel.__qualname__ = _cache_name("log_weights", row, name)
    return jit(kernel, parallel, fastmath=True)


def _make_rows(row, name: str):
    def kernel(x, params, out):
        for b in range(x.shape[0]):
            out[b] = row(x[b], params[b])
    kernel.__qualname__ = _cache_name("log_prob_rows", row, name)
    return njit(cache=True, fastmath=True)(kernel)


def _cache_name(kind: str, row, name: str) -> str:
    """A name per likelihood that changes with the row's source: Numba's disk cache only watches this file, so
    an edited likelihood row must not load the machine code compiled from its old version."""
    import hashlib
    import inspect

    digest = hashlib.sha256(inspect.getsource(row).encode()).hexdigest()[:10]
    return f"{kind}_{name.replace('-', '_')}_{digest}"


def _likelihood(likelihood):
    if likelihood is None:
        return _get_likelihood("bernoulli")
    return likelihood


def _make_reparameterize(parallel: bool):
    def kernel(mu, logvar, eps, out):
        """z[b, k] = mu[b] + exp(logvar[b] / 2) * eps[b, k]  (K&W 2013, eq. 4)."""
        n, k, d = eps.shape
        for b in numba.prange(n):
            for i in range(d):
                sigma = math.exp(HALF * logvar[b, i])
                for s in range(k):
                    out[b, s, i] = mu[b, i] + sigma * eps[b, s, i]
    return jit(kernel, parallel, fastmath=True)


@njit(cache=True)
def _logmeanexp(log_w, out):
    """out[b] = log (1/K) sum_k exp(log_w[b, k]), max-shifted (Burda et al. 2015, eq. 8), in float64."""
    n, k = log_w.shape
    for b in range(n):
        m = -np.inf
        for s in range(k):
            m = max(m, log_w[b, s])
        acc = 0.0
        for s in range(k):
            acc += math.exp(log_w[b, s] - m)
        out[b] = m + math.log(acc) - math.log(k)


_REPARAM = (_make_reparameterize(False), _make_reparameterize(True))


def _pick(kernels, work: int):
    return kernels[work >= PARALLEL_MIN]


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def reparameterize(mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """z (B, K, D) from mu, logvar (B, D) and eps (B, K, D); up to `NUMPY_MAX` values by the NumPy twin, whether
    or not Numba is loaded (so a result depends only on its size, never on what ran before in the process; the
    two agree to float32 rounding)."""
    if eps.size <= NUMPY_MAX:
        return reparameterize_numpy(_f32(mu), _f32(logvar), _f32(eps))
    out = np.empty(eps.shape, np.float32)
    _pick(_REPARAM, eps.size)(_f32(mu), _f32(logvar), _f32(eps), out)
    return out


_NO_LOG_PZ = np.empty((0, 0), np.float32)


def log_weights(x: np.ndarray, params: np.ndarray, z: np.ndarray, mu: np.ndarray, logvar: np.ndarray,
                likelihood=None, log_pz: np.ndarray | None = None) -> np.ndarray:
    """Importance log-weights (B, K) float32 = log p(x|z) + log p(z) - log q(z|x); params (B, K, P*D) from the
    decoder, likelihood from `likelihoods` (default Bernoulli); log_pz (B, K) the prior's log-density of z, or
    None for N(0, I) (computed inside, fused)."""
    lk = _likelihood(likelihood)
    if lk.name not in _LOG_WEIGHTS:
        _LOG_WEIGHTS[lk.name] = tuple(_make_log_weights(lk.row, lk.name, p) for p in (False, True))
    out = np.empty(z.shape[:2], np.float32)
    _check_rows(x, params, z.shape[:2], lk)
    if log_pz is None:
        log_pz = _NO_LOG_PZ
    elif log_pz.shape != z.shape[:2]:
        raise ValueError(f"log_pz {log_pz.shape} does not fit z {z.shape}")
    _pick(_LOG_WEIGHTS[lk.name], params.size)(_f32(x), _f32(params), _f32(z), _f32(mu), _f32(logvar), _f32(log_pz),
                                              out)
    return out


def _check_rows(x: np.ndarray, params: np.ndarray, lead: tuple, lk) -> None:
    """The kernels do not check bounds: shapes are checked here, once per call."""
    if params.shape != (*lead, lk.n_params * x.shape[-1]) or x.shape[0] != lead[0]:
        raise ValueError(f"x {x.shape} and params {params.shape} do not fit a {lk.name} likelihood")


def log_mean_exp(log_w: np.ndarray) -> np.ndarray:
    """log (1/K) sum_k exp(log_w) over the last axis, float64 (B,): the IWAE estimate (ELBO estimate at K=1)."""
    out = np.empty(log_w.shape[0], np.float64)
    _logmeanexp(np.ascontiguousarray(log_w), out)
    return out


def log_prob_rows(x: np.ndarray, params: np.ndarray, likelihood=None) -> np.ndarray:
    """log p(x|z) per row (B,) float32 from decoder params (B, P*D)."""
    lk = _likelihood(likelihood)
    if lk.name not in _ROWS:
        _ROWS[lk.name] = _make_rows(lk.row, lk.name)
    _check_rows(x, params, params.shape[:1], lk)
    out = np.empty(x.shape[0], np.float32)
    _ROWS[lk.name](_f32(x), _f32(params), out)
    return out


def gaussian_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(q || N(0, I)) per row (B,), K&W 2013 appendix B (tiny: NumPy is as fast as a kernel here)."""
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    return -0.5 * np.sum(1.0 + logvar - mu**2 - np.exp(logvar), axis=-1)


# ---- NumPy reference twins (float64, textbook formulas) ----


def reparameterize_numpy(mu, logvar, eps):
    return (mu[:, None, :] + np.exp(0.5 * logvar)[:, None, :] * eps).astype(np.float32)


def log_weights_numpy(x, params, z, mu, logvar, likelihood=None, log_pz=None):
    x, params, z = (np.asarray(a, np.float64) for a in (x, params, z))
    mu, logvar = np.asarray(mu, np.float64)[:, None], np.asarray(logvar, np.float64)[:, None]
    log_px = _likelihood(likelihood).log_prob_numpy(x[:, None, :], params)
    if log_pz is None:
        log_pz = -0.5 * np.sum(LOG_2PI + z**2, axis=-1)
    log_qz = -0.5 * np.sum(LOG_2PI + logvar + (z - mu) ** 2 * np.exp(-logvar), axis=-1)
    return log_px + log_pz - log_qz


def log_mean_exp_numpy(log_w):
    log_w = np.asarray(log_w, np.float64)
    m = log_w.max(axis=-1, keepdims=True)
    return (m + np.log(np.mean(np.exp(log_w - m), axis=-1, keepdims=True)))[:, 0]
