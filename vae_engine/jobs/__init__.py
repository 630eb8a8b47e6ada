"""Batch jobs over items (encode, decode, reconstruct, sample, score, detect, evaluate), local and on Ray Data,
and their output writer. The names of the local jobs (`batch`) are re-exported here, as the flat layout had them."""

from ..core.lazy import exports

_NAMES = {name: "batch" for name in (
    "Source", "open_items", "open_latents", "open_input", "check_output", "stream", "counter", "make_job_fn",
    "item_shape", "score_items", "JOB_NAMES", "JOBS")}
__getattr__ = exports(__name__, _NAMES)
__all__ = list(_NAMES)
