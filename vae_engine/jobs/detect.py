"""The `detect` job and `train --contamination`: the detector stored in a model folder (`rules.StoredDetector`: no
scikit-learn needed to apply it), applied to a file; `train --contamination` fits it with `VAEOutlierDetector`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import data, modeldir
from ..anomaly import rules
from ..anomaly.rules import StoredDetector
from ..core import atomic
from ..core.config import RULES
from ..core.errors import DataError, VaeEngineError


def _items(path: str | Path, n_features: int) -> np.ndarray:
    """The file's items as float (N, D) by the one input rule (uint8 = intensity / 255)."""
    from ..data import readers

    items = readers.read(path)[0]
    x = data.to_float(items).reshape(len(items), -1)
    if x.shape[1] != n_features:
        raise DataError(f"{path}: items have {x.shape[1]} features, the detector was fitted on {n_features}")
    if len(x) == 0:
        raise DataError(f"{path}: no items to score")
    return x


def store_threshold(model_dir: Path, rule: str, contamination: float, k: int = 64) -> float:
    """After training: calibrate a detector on the model's own training items and write detector.json."""
    train_cfg = modeldir.train_config(model_dir)
    ds = data.load_training_data(train_cfg)
    x = data.to_float(ds.train_images).reshape(len(ds.train_images), -1)[: train_cfg.limit]
    from ..anomaly.detector import VAEOutlierDetector, write_detector

    det = VAEOutlierDetector(rule=rule, contamination=contamination, k=k)
    det.calibrate(model_dir, np.ascontiguousarray(x, np.float32), train_cfg.seed)
    write_detector(model_dir, det)
    return det.offset_


def run(model_dir: Path, input: Path, output: Path, scores_path: Path | None, contamination: float | None,
        threshold: float | None, labels_path: Path | None, plot: Path | None, threads: int | None,
        backend: str = "auto", precision: str = "fp32") -> dict:
    """Score a file with the stored detector, flag by the stored (or given) threshold, write flags (and scores)."""
    from ..runtime.backends import set_threads

    if contamination is not None and threshold is not None:
        raise VaeEngineError("give --contamination or --threshold, not both")
    rules.check_rule(RULES[0], contamination)
    if threshold is not None and not np.isfinite(threshold):
        raise VaeEngineError("--threshold must be a finite number")
    for path in (output, scores_path, plot):
        if path is not None:
            atomic.check_writable(path)
    model_dir = modeldir.resolve_model_dir(model_dir)
    det = StoredDetector.load(model_dir, threads=set_threads(threads), backend=backend, precision=precision)
    x = _items(input, det.n_features)
    labels = None
    if labels_path is not None:
        from ..data.readers import load_npy

        labels = np.asarray(load_npy(labels_path)).reshape(-1)
        if len(labels) != len(x) or labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
            raise DataError(f"{labels_path}: labels must be {len(x)} values of 0/1 (1 = anomaly)")
    try:
        scores = det.score_samples(x)
    except DataError as exc:
        raise DataError(f"{input}: {exc}") from None
    offset = threshold if threshold is not None else (
        float(np.percentile(scores, 100 * contamination)) if contamination is not None else det.offset)
    flags = rules.flags(scores, offset)
    result = {"n": len(x), "flagged": int((flags == -1).sum()), "rule": det.rule, "threshold": offset}
    if labels is not None and 0 < labels.sum() < len(labels):
        from sklearn.metrics import average_precision_score, roc_auc_score

        result["roc_auc"] = float(roc_auc_score(labels, -scores))
        result["average_precision"] = float(average_precision_score(labels, -scores))
    atomic.save_npy(output, flags)
    if scores_path is not None:
        atomic.save_npy(scores_path, scores)
    if plot is not None:
        from ..core.figures import anomaly_chart

        anomaly_chart(scores, offset, det.rule, labels, plot)
    return result
