"""Data: readers for every accepted input kind (`readers`, `idx`), the bundled and downloadable datasets
(`datasets`), and the one input rule (`inputs.model_input`). The public names are re-exported here."""

from .datasets import (
    DATASETS,
    DOWNLOADS,
    SPLITS,
    Dataset,
    bundled_dir,
    cache_dir,
    download,
    load_dataset,
    load_split,
    load_test_data,
    load_training_data,
    resolve_data_dir,
    sample_photos,
    split_indices,
)
from .idx import IMAGES_MAGIC, LABELS_MAGIC, MAX_IDX_BYTES, parse_idx, read_idx, sha256_idx
from .inputs import check_fits, items, latents, model_input, to_float, to_unit

__all__ = [
    "DATASETS", "DOWNLOADS", "SPLITS", "Dataset", "bundled_dir", "cache_dir", "download", "load_dataset",
    "load_split", "load_test_data", "load_training_data", "resolve_data_dir", "sample_photos", "split_indices",
    "IMAGES_MAGIC",
    "LABELS_MAGIC", "MAX_IDX_BYTES", "parse_idx", "read_idx", "sha256_idx", "items", "latents",
    "model_input", "to_float", "to_unit", "check_fits",
]
