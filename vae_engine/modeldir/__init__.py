"""The model folder: its layout, file names and lock (`layout`), config.json (`configfile`), the weights and a
VampPrior's mixture checked against the model (`weights`), the resume state and metrics (`state`); and the ONNX
graphs' specs, loading and metadata (`graphs`, imported on its own). The folder's names are re-exported here:
callers write `modeldir.load_model(...)`, `modeldir.CONFIG`."""

from .configfile import model_config, read_config, train_config, versions, write_config
from .layout import (
    CONFIG,
    EVALUATION,
    EXPORT_REPORT,
    FORMAT,
    INFERENCE_FILES,
    LOCK,
    MAX_JSON_BYTES,
    METRICS,
    PLOTS,
    PRIOR,
    STATE,
    WEIGHTS,
    lock,
    put_entry,
    read_entries,
    read_json,
    resolve_model_dir,
)
from .state import load_state, read_metrics, save_state, write_metrics
from .weights import (
    check_tensors,
    file_sha256,
    load_model,
    load_prior,
    load_tensors,
    save_prior,
    save_tensors,
    save_weights,
    weights_sha256,
)

__all__ = [
    "CONFIG", "EVALUATION", "EXPORT_REPORT", "FORMAT", "INFERENCE_FILES", "LOCK", "MAX_JSON_BYTES", "METRICS", "PLOTS",
    "PRIOR", "STATE", "WEIGHTS", "lock", "read_json", "resolve_model_dir", "model_config", "read_config",
    "train_config", "versions", "write_config", "load_state", "read_metrics", "save_state", "write_metrics",
    "check_tensors", "load_model", "load_prior", "load_tensors", "save_prior", "save_tensors", "save_weights",
    "weights_sha256", "file_sha256", "read_entries", "put_entry",
]
