"""The detector's scoring rules and its stored form, in NumPy: what `detect`, `score --rule` and the server apply
to a fitted detector (detector.json over a model folder) without importing scikit-learn, whose estimator API
(`VAEOutlierDetector`, `detector.py`) fits and wraps them. The rules are described in `detector.py`."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import modeldir
from ..core import rng
from ..core.config import LOG_2PI, RULES
from ..core.errors import DataError, ModelDirError, VaeEngineError
from ..model import kernels

DETECTOR = "detector.json"
SCHEMA = "vae-engine-detector/1"
CHUNK = 256  # rows per network call, padded: the same kernels for every item, whatever the caller's batch


def check_rule(rule: str, contamination=None, error: type[Exception] = VaeEngineError,
               name: str = "--contamination") -> None:
    """A scoring rule's name and a contamination fraction (None: not given; "auto" where the estimator takes
    it), or one clear error: the CLI's and the jobs' VaeEngineError, the estimator's ValueError (scikit-learn's
    convention for parameters)."""
    if rule not in RULES:
        raise error(f"unknown scoring rule {rule!r}: choose one of {', '.join(RULES)}")
    c = contamination
    if not (c is None or c == "auto" or (isinstance(c, int | float) and not isinstance(c, bool) and 0 < c <= 0.5)):
        auto = "'auto' or " if error is ValueError else ""
        raise error(f"{name} must be {auto}a fraction in (0, 0.5], got {c!r}")


def flags(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The detector's verdict per item: +1 inlier, -1 outlier (a normality score below the threshold), int8."""
    return np.where(np.asarray(scores) < threshold, -1, 1).astype(np.int8)


def chunks(X: np.ndarray):
    """(i, j, padded chunk) over X: every network call sees CHUNK rows, so results do not depend on batching."""
    for i in range(0, len(X), CHUNK):
        chunk = X[i : i + CHUNK]
        if len(chunk) < CHUNK:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], CHUNK - len(chunk), axis=0)])
        yield i, min(len(X), i + CHUNK), np.ascontiguousarray(chunk)


def rule_scores(engine, X: np.ndarray, rule: str, k: int, seed: int, latent_mean, latent_cov, quantize_range,
                chunks) -> np.ndarray:
    """The normality scores (n,) of one rule (see the module docstring), chunk by chunk."""
    out = np.empty(len(X), np.float64)
    for i, j, chunk in chunks(X):
        if rule in ("nll", "nll-complexity"):
            s = engine.log_likelihood(chunk, k=k, streams=rng.Streams.shared(seed, 0, len(chunk)))[: j - i]
            if rule == "nll-complexity":
                s = s + complexity_nats(X[i:j], quantize_range)
        else:
            mu = engine.encode(chunk)[0]
            if rule == "reconstruction":
                x = engine.prepare_items(chunk)
                s = kernels.log_prob_rows(x, engine.backend.decode(mu), engine.likelihood)[: j - i]
            else:
                s = gaussian_log_density(mu[: j - i].astype(np.float64), latent_mean, latent_cov)
        out[i:j] = s
    return out


def complexity_nats(X: np.ndarray, quantize_range) -> np.ndarray:
    """zlib (level 9) code length of each item quantized to 8 bits over the training range, in nats."""
    lo, hi = quantize_range
    q = np.clip(np.round((X - lo) / np.maximum(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)
    return np.array([len(zlib.compress(row.tobytes(), 9)) for row in q], np.float64) * 8 * np.log(2)


def gaussian_log_density(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """log N(x; mean, cov) per row, by a Cholesky factor."""
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - mean).T)  # (L, n)
    return -0.5 * (np.sum(sol**2, 0) + len(mean) * LOG_2PI) - np.sum(np.log(np.diag(chol)))


def read_detector(folder: Path) -> dict:
    """detector.json of a model folder, checked field by field (ModelDirError says what is wrong)."""
    path = Path(folder) / DETECTOR
    if not path.is_file():
        raise ModelDirError(f"{folder}: no {DETECTOR}; train with --contamination or save a fitted "
                            "VAEOutlierDetector there")
    doc = modeldir.read_json(path, "detector file")
    cfg = modeldir.model_config(folder)
    try:
        ok = (doc["schema"] == SCHEMA and doc["rule"] in RULES and isinstance(doc["k"], int) and doc["k"] >= 1
              and isinstance(doc["seed"], int) and np.isfinite(doc["offset"])
              and doc["n_features"] == cfg.input_dim
              and np.asarray(doc["latent_mean"], np.float64).shape == (cfg.latent_dim,)
              and np.asarray(doc["latent_cov"], np.float64).shape == (cfg.latent_dim, cfg.latent_dim)
              and np.asarray(doc["quantize_range"], np.float64).shape == (2, cfg.input_dim))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelDirError(f"{path}: malformed or does not match config.json; refit and save the detector")
    return doc


@dataclass
class StoredDetector:
    """A fitted detector as stored in a model folder (detector.json), applied by `detect` and the server: the
    same scores as `VAEOutlierDetector.load(...).score_samples`, without scikit-learn."""

    model_dir: Path
    doc: dict
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    _engine: object = None

    @classmethod
    def load(cls, model_dir: str | Path, backend: str = "auto", precision: str = "fp32",
             threads: int | None = None, engine=None) -> StoredDetector:
        """The detector stored in a model folder; scored by `engine` when given (a server's own), else by an
        engine of its model on `backend`/`precision`, loaded on first use."""
        return cls(Path(model_dir), read_detector(Path(model_dir)), backend, precision, threads, engine)

    @property
    def rule(self) -> str:
        return self.doc["rule"]

    @property
    def offset(self) -> float:
        return float(self.doc["offset"])

    @property
    def n_features(self) -> int:
        return int(self.doc["n_features"])

    @property
    def engine(self):
        from ..runtime.engine import Engine

        if self._engine is None:
            self._engine = Engine.load(self.model_dir, backend=self.backend, precision=self.precision,
                                       threads=self.threads)
        return self._engine

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Normality score per item (n,) float64, higher = more normal; X float (n, n_features), finite."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise DataError(f"X has shape {X.shape}; the detector was fitted on {self.n_features} features")
        if not np.isfinite(X).all():
            raise DataError("X holds NaN or Inf values")
        d = self.doc
        return rule_scores(self.engine, X, d["rule"], d["k"], d["seed"], np.asarray(d["latent_mean"], np.float64),
                           np.asarray(d["latent_cov"], np.float64),
                           tuple(np.asarray(r, np.float64) for r in d["quantize_range"]), chunks)
