"""OpenVINO's runtime, imported without its model-conversion tools.

`import openvino` also tries `from openvino.tools.ovc import convert_model` (model conversion, which imports its
telemetry and urllib): 60 of its 72 ms here, for a function the engine never calls (it hands OpenVINO checked ONNX
bytes). That one import is made to fail while openvino loads, then `openvino.convert_model` is restored lazily, so
code that uses it in the same process still finds it. A process that imported openvino before keeps it as it is.
"""

from __future__ import annotations

import sys

from ...core.lazy import without

_TOOLS = "openvino.tools.ovc"


def _convert_model(name: str):
    if name != "convert_model":
        raise AttributeError(f"module 'openvino' has no attribute {name!r}")
    from openvino.tools.ovc import convert_model

    ov.convert_model = convert_model
    return convert_model


if "openvino" in sys.modules:
    import openvino as ov
else:
    with without(_TOOLS):  # openvino's __init__ passes over the ImportError
        import openvino as ov
    if "convert_model" not in vars(ov):
        ov.__getattr__ = _convert_model  # PEP 562: looked up in the module's namespace on a missing attribute
