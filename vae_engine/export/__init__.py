"""ONNX export of the encoder and decoder as two validated graphs, and their quantized (int8, fp16) variants."""

from ..core.lazy import exports

_NAMES = {"export": "exporter"}
__getattr__ = exports(__name__, _NAMES)
__all__ = list(_NAMES)
