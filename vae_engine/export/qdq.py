"""int8 graphs for convolution networks (imported models): ONNX Runtime's static QDQ quantization, one layer set
searched against the model's own accuracy budget.

The trainer's MLPs have their own int8 rewrite (`quantize.py`: per-item activation scales, GPTQ weights). A
convolution network (the Stable Diffusion VAE, a user's modules) is quantized the way ONNX Runtime fuses best:
QuantizeLinear/DequantizeLinear pairs around each chosen Conv/ConvTranspose/Gemm/MatMul with a constant weight,
which its CPU provider runs as integer kernels (QLinearConv and friends).

- Static activation ranges (MinMax over calibration items, measured once): an item's answer does not depend on the
  items it is batched with, as the engine requires of every path.
- Weights int8 with one scale per output channel, reduced to 7 bits (`reduce_range`: |q| <= 64): without VNNI the
  CPU adds two u8 x s8 products into a saturating int16 (255 x 127 x 2 overflows it, 255 x 64 x 2 = 32,640 does
  not), so the graph gives the same answer on every x86 class. Activations uint8.
- Which layers: `grow` bisects each graph's layers in graph order, keeping every block of layers whose addition
  keeps the pair within the accuracy budget: one evaluation when the whole graph fits, a few per layer left out
  (the caller bounds the evaluations: each is seconds on a large model). Then a graph whose int8 set does not run
  faster than its fp32 graph keeps none (a stock QDQ decoder of the SD VAE measured ~1.05x: not worth its error).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # with a constant weight: the layers worth integer kernels


def layers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that can be quantized, in graph order: WEIGHT_OPS whose weight is an initializer (so an
    attention's activation x activation MatMul stays float)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits]


def ranges(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], scratch: Path | None = None):
    """Each tensor's activation range over the calibration feeds (MinMax): ONNX Runtime's calibrator, run once
    (its files, a copy of the graph, in `scratch`: the export's own scratch folder, cleaned with it)."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="calibrate-", dir=scratch) as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        calibrator = create_calibrator(path, list(WEIGHT_OPS), augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(Reader())
        found = calibrator.compute_data()
        del calibrator
    return found


def quantize(model: onnx.ModelProto, tensor_ranges, nodes: list[str]) -> onnx.ModelProto:
    """A copy of the graph with the named nodes in QDQ int8 (per-channel 7-bit weights, uint8 activations); no
    nodes: an unchanged copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not nodes:
        return out
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    quantizer = QDQQuantizer(out, True, True, QuantType.QInt8, QuantType.QUInt8, tensor_ranges, list(nodes), [],
                             list(WEIGHT_OPS), {})
    quantizer.quantize_model()
    quantizer.model.topological_sort()  # the quantizer appends its nodes; onnx.checker and the fused graph need order
    return quantizer.model.model


def grow(chosen: list[str], block: list[str], fits: Callable[[list[str]], bool]) -> list[str]:
    """`chosen` plus as many of `block`'s layers as keep `fits`: the whole block if it fits, else each half in turn
    (layers whose int8 errors add up are found in a few evaluations; a single layer that does not fit is left
    out)."""
    if not block:
        return chosen
    if fits(chosen + block):
        return chosen + block
    if len(block) == 1:
        return chosen
    half = len(block) // 2
    return grow(grow(chosen, block[:half], fits), block[half:], fits)
