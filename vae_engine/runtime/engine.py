"""The public inference API: a VAE behind any backend, with Numba kernels for sampling and the ELBO/IWAE math.

All randomness comes from the counter-based streams of `rng`, keyed by (seed, global item index): results for a
seed do not depend on batch size, chunking, thread count or backend.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .. import data, modeldir
from ..core import hardware, rng
from ..core.config import MAX_SCORE_K, SCORE_ROWS, SEED_MAX, ModelConfig, check_int
from ..core.errors import DataError, VaeEngineError
from ..model import kernels, likelihoods
from . import tuning
from .backends import Backend, load_backend, set_threads
from .backends.base import BackendDefaults


class Engine:
    """Encode, decode, sample, reconstruct and score with a trained VAE.

    Items are (B, *input_shape) or flattened (B, D), by the CLI's one input rule (`data.model_input`: uint8 is
    intensity / 255, numbers as they are, [0, 1] for the Bernoulli likelihoods); anything else raises DataError.
    Latents are finite floats (B, L). Decoding returns E[x|z] in raw units; `decode(z, params=True)` the
    likelihood's parameters (Bernoulli logits, or [mean | logvar] for the Gaussian).

    >>> engine = Engine.load()                            # doctest: +SKIP  (the shipped model)
    >>> mu, logvar = engine.encode(x)                     # x (B, 784) or (B, 28, 28), uint8 or [0, 1] floats
    """

    def __init__(self, backend: Backend, cfg: ModelConfig, model_dir: Path, threads: int,
                 decision: dict | None = None):
        self.backend, self.cfg, self.model_dir, self.threads = backend, cfg, model_dir, threads
        self.likelihood = likelihoods.get(cfg.likelihood)
        self.prior = modeldir.load_prior(model_dir, cfg)  # N(0, I), or a VampPrior's mixture from the folder
        self.decision = decision  # the `--precision auto` decision (tuning.choose), or None

    @classmethod
    def load(cls, model_dir: str | Path | None = None, backend: str = "auto", device: str = "cpu",
             threads: int | None = None, precision: str = "fp32", spin: bool = False, batch_size: int = 1024,
             max_nll_change: float | None = None, progress=None, items: int | None = None) -> Engine:
        """Load a model directory (default: the shipped model) with the named backend and precision.

        precision="auto" runs (or reuses from the model folder) `tuning.choose`: the fastest path here at
        `batch_size` whose mean NLL change against fp32 stays within `max_nll_change` nats (default 0.01), and,
        when `threads` is None, the thread count it runs fastest with (one thread wins at batch 1 on some CPUs).
        `items`: the size of the job ahead (items, or decoder rows), when known: auto then takes the measured path
        that finishes it soonest, its runtime's import and opening counted (`tuning.for_items`); a server or a
        long-lived engine leaves it None and gets the fastest path.
        """
        model_dir = modeldir.resolve_model_dir(model_dir)
        cfg = modeldir.model_config(model_dir)
        decision = None
        if device != "cpu":  # "auto" -> a GPU where torch sees one; a GPU missing is one clear error, before any
            device = hardware.resolve_device(device)  # path is measured
        if precision == "auto":
            budget = tuning.DEFAULT_BUDGET if max_nll_change is None else max_nll_change
            decision = tuning.choose(cls.load, model_dir, backend, device, threads, batch_size, budget,
                                     progress=progress, items=items)
            opened = decision.pop("engine", None)
            if opened is not None and not spin:  # a short job runs on the engine its path was timed on
                opened.decision = decision
                return opened
            if items is not None:
                row = tuning.for_items(decision, items)
                decision = {**decision, "backend": row["backend"], "precision": row["precision"],
                            "threads": row["threads"], "for_items": items}
            backend, precision = decision["backend"], decision["precision"]
            threads = decision.get("threads", threads)  # decisions saved before threads were part of them
        threads = set_threads(threads)
        return cls(load_backend(model_dir, backend, precision, threads, device, spin), cfg, model_dir, threads,
                   decision)

    @property
    def path(self) -> str:
        """The path this engine runs, e.g. 'onnxruntime/int8', with the reason when it was chosen by auto."""
        return tuning.describe_path(self.backend.name, self.backend.precision, self.decision)

    @property
    def latent_dim(self) -> int:
        """Values in one item's latent, flattened: what every array the engine returns has per row."""
        return self.cfg.latent_dim

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One item's latent as the model declares it, e.g. (4, 32, 32) for an imported AutoencoderKL: the jobs
        and the server give latents this shape (`z.reshape(-1, *engine.latent_shape)`); (L,) for a trained VAE."""
        return self.cfg.latent_shape

    def prepare_items(self, x: np.ndarray, name: str = "x", start: int = 0) -> np.ndarray:
        """Items by the one input rule (`data.items`) -> contiguous float32 (B, D) in model units."""
        return data.items(x, self.cfg, self.likelihood.unit_interval, name, start)

    def prepare_latents(self, z: np.ndarray, name: str = "z") -> np.ndarray:
        """Latent-space arrays (z, mu, logvar) by the one input rule (`data.latents`) -> contiguous float32."""
        return data.latents(z, self.cfg.latent_shape, name)

    def _sample(self, mu: np.ndarray, logvar: np.ndarray, k: int, seed: int, start: int) -> np.ndarray:
        """z (B, K, D) from checked float32 (mu, logvar), e.g. straight from the backend (which checks them)."""
        return kernels.reparameterize(mu, logvar, rng.normal_eps(seed, start, len(mu), k, self.latent_dim))

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q(z|x) parameters (mu, logvar), each (B, D)."""
        return self.backend.encode(self.prepare_items(x))

    def decode(self, z: np.ndarray, params: bool = False) -> np.ndarray:
        """E[x|z] (B, D) in raw units (pixel probabilities for Bernoulli), or the likelihood's parameters."""
        z = self.prepare_latents(z)
        return self.backend.decode(z) if params else self._mean(z)

    def _mean(self, z: np.ndarray) -> np.ndarray:
        """E[x|z] of checked latents: inside the runtime's call where the backend has a mean graph (ONNX Runtime,
        OpenVINO), else the likelihood's NumPy mean of the decoder's parameters (`BackendDefaults`)."""
        return self.backend.decode_mean(z)

    def decode_sample(self, z: np.ndarray, seed: int = 0, start: int = 0) -> np.ndarray:
        """One draw x ~ p(x|z) (B, D) per latent, row b from the counter streams of item start+b of seed: Bernoulli
        pixels, continuous-Bernoulli intensities or Gaussian values, by the model's likelihood."""
        _check_stream(seed, start)
        return self.likelihood.sample(self.decode(z, params=True), seed, start)

    def sample_posterior(self, mu: np.ndarray, logvar: np.ndarray, k: int = 1, seed: int = 0,
                         start: int = 0) -> np.ndarray:
        """z (B, K, D) ~ q(z|x) by reparameterization, eps from stream (seed, item start+b)."""
        _check_stream(seed, start)
        mu, logvar = self.prepare_latents(mu, "mu"), self.prepare_latents(logvar, "logvar")
        if mu.shape != logvar.shape:
            raise DataError(f"mu {mu.shape} and logvar {logvar.shape} must have the same shape")
        return self._sample(mu, logvar, check_int("k", k, 1, MAX_SCORE_K), seed, start)

    def sample(self, n: int, seed: int = 0, start: int = 0) -> np.ndarray:
        """n items (n, D) as E[x|z], decoded from z ~ p(z) (item start+i reads stream (seed, start+i))."""
        _check_stream(seed, start)
        return self.decode(self.prior.sample(seed, start, check_int("n", n, 0)))

    def reconstruct(self, x: np.ndarray, sample: bool = False, seed: int = 0, start: int = 0) -> np.ndarray:
        """Decode the posterior mean (or one posterior sample) of each input: E[x|z] (B, D)."""
        _check_stream(seed, start)
        if not sample:  # one fused call where the backend has one
            return self.backend.reconstruct(self.prepare_items(x))
        mu, logvar = self.encode(x)  # checked by the backend: no second validation on the way to the decoder
        return self._mean(self._sample(mu, logvar, 1, seed, start)[:, 0])

    def check_scores(self) -> None:
        """Raise the one clear error where this model cannot be scored: an imported autoencoder that declares no
        likelihood or no prior (`likelihoods.none`, `engine_priors.NoPrior`). Jobs call it before any work."""
        if self.cfg.cannot_score:
            raise VaeEngineError(self.cfg.cannot_score)

    def elbo(self, x: np.ndarray, seed: int = 0, start: int = 0, streams: rng.Streams | None = None) -> np.ndarray:
        """ELBO per input (B,): one posterior sample for log p(x|z), the KL analytic for N(0, I) (K&W 2013, eq. 10)
        and estimated at that sample for a VampPrior. `streams` (optional) says which eps stream each item reads;
        default: (seed, start + b)."""
        self.check_scores()
        x = self.prepare_items(x)
        streams = _streams(streams, seed, start, len(x))
        mu, logvar = self.backend.encode(x)
        eps = streams.eps(0, len(x), 1, self.latent_dim)
        z = kernels.reparameterize(mu, logvar, eps)[:, 0]
        log_px = kernels.log_prob_rows(x, self.backend.decode(z), self.likelihood)
        return log_px - self.prior.kl(mu, logvar, z, eps[:, 0])

    def log_likelihood(self, x: np.ndarray, k: int = 5000, seed: int = 0, start: int = 0,
                       streams: rng.Streams | None = None) -> np.ndarray:
        """IWAE estimate of log p(x) per input (B,) with k importance samples (Burda et al. 2015, eq. 8).

        Streams over K in blocks of SCORE_ROWS decoder rows, combining blocks by log-sum-exp in float64: memory
        stays bounded whatever k is, and every block draws its own slice of the item's eps stream.
        `streams` gives each item's eps stream explicitly (default: (seed, start + b)); e.g. `rng.Streams.shared`
        makes every item read one stream (common random numbers), so an estimate depends on the item alone.
        """
        return self.log_weight_sums(x, k, 0, k, seed, start, streams) - np.log(k)  # k checked there

    def log_weight_sums(self, x: np.ndarray, k: int, s0: int, s1: int, seed: int = 0, start: int = 0,
                        streams: rng.Streams | None = None) -> np.ndarray:
        """log sum_{s0 <= s < s1} w_s per input (B,) float64, of the k importance weights of the IWAE estimate:
        `log_likelihood` is all k of them less log k, and the partial sums of any split of [0, k) combine into it
        by log-sum-exp (a server runs a long request in such slices)."""
        self.check_scores()
        x = self.prepare_items(x)
        k = check_int("k", k, 1, MAX_SCORE_K)
        if not 0 <= s0 < s1 <= k:
            raise DataError(f"samples {s0}..{s1} are not a range within the k={k} samples")
        streams = _streams(streams, seed, start, len(x))
        mu, logvar = self.backend.encode(x)
        # a GPU backend computes the log-weights itself, next to the decoder's outputs (the prior's log-density too)
        on_device = self.backend.score_rows

        def block_log_sum(i: int, j: int, eps) -> np.ndarray:
            if on_device:
                log_w = self.backend.log_weights(x[i:j], mu[i:j], logvar[i:j], eps, self.prior)
            else:
                z = kernels.reparameterize(mu[i:j], logvar[i:j], eps)  # (b, K', D)
                params = self.backend.decode(z.reshape(-1, self.latent_dim)).reshape(j - i, eps.shape[1], -1)
                log_pz = None if self.prior.standard else \
                    self.prior.log_prob(z.reshape(-1, self.latent_dim)).reshape(z.shape[:2])
                log_w = kernels.log_weights(x[i:j], params, z, mu[i:j], logvar[i:j], self.likelihood, log_pz)
            return kernels.log_mean_exp(log_w) + np.log(eps.shape[1])  # log sum_k w over this block

        return rng.iwae_log_sums(streams, k, self.latent_dim, on_device or SCORE_ROWS, block_log_sum,
                                 self.backend.device if on_device else None, (s0, s1))

    def warm_up(self, kernels: bool = True) -> None:
        """Run every op once on one item, so that a server's first requests do not pay for what is made on first
        use: the fused ONNX Runtime graphs (measured on the 2-core AVX2 EPYC: a first encode 446 ms, reconstruct
        42 ms, E[x|z] 6.6 ms, against 0.1-0.2 ms after) and, with `kernels`, the Numba kernels (loaded from their
        cache; Numba's own set-up is most of it, ~0.6 s). A server warms the graphs before it is ready and the
        kernels just after (`serving.app`): until they are loaded, the input rule runs on NumPy, with the same
        results."""
        x = self.prepare_items(np.zeros((1, self.cfg.input_dim), np.uint8))  # x: float32
        self.reconstruct(x)
        z = np.zeros((1, self.latent_dim), np.float32)
        self.decode(z)
        self.decode(z, params=True)
        if kernels:
            self.warm_kernels()

    def warm_kernels(self) -> None:
        """Load every Numba kernel the ops run (from Numba's on-disk cache) without calling the backend: the same
        code runs over a stand-in that answers zeros of the backend's shapes, so this can run on another thread
        while the backend serves requests."""
        from ..data import inputs

        inputs.warm()
        stand_in = copy.copy(self)  # this engine's prior and likelihood, over the stand-in backend
        stand_in.backend = _Zeros(self)
        x = np.zeros((1, self.cfg.input_dim), np.float32)
        if not self.cfg.cannot_score:  # not an imported autoencoder
            stand_in.scores(x, 0, 2, 0)
            stand_in.decode_sample(np.zeros((1, self.latent_dim), np.float32))
            self.prior.sample(0, 0, 1)
        rng.binarize(x, 0, 0)
        stand_in.sample_posterior(np.zeros((1, self.latent_dim), np.float32), np.zeros((1, self.latent_dim),
                                                                                       np.float32))

    def scores(self, x: np.ndarray, start: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(-ELBO, -log p(x) estimate) per input: the same quantities as `estimators.reference_scores`."""
        return -self.elbo(x, seed, start), -self.log_likelihood(x, k, seed, start)


class _Zeros(BackendDefaults):
    """A stand-in backend answering zeros of a backend's shapes (`Engine.warm_kernels`)."""

    def __init__(self, engine: Engine):
        self.name, self.precision, self.provider, self.likelihood = "zeros", "fp32", "none", engine.likelihood
        self.latent_dim, self.out_dim = engine.latent_dim, engine.likelihood.n_params * engine.cfg.input_dim

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(x), self.latent_dim), np.float32), np.zeros((len(x), self.latent_dim), np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return np.zeros((len(z), self.out_dim), np.float32)


def _streams(streams: rng.Streams | None, seed: int, start: int, n: int) -> rng.Streams:
    """The given streams (one per item, checked), or items start..start+n-1 of seed."""
    if streams is None:
        _check_stream(seed, start)
        return rng.Streams.contiguous(seed, start, n)
    if len(streams) != n:
        raise DataError(f"streams cover {len(streams)} items, the batch has {n}")
    for seed_, first, count, _ in streams.runs:
        _check_stream(seed_, first + count)
    return streams


def _check_stream(seed: int, start: int) -> None:
    """Seeds and item indices key the counter-based streams: integers in range, or a clear error."""
    check_int("seed", seed, 0, SEED_MAX)
    check_int("start", start, 0, 2**48)
