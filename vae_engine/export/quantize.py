"""int8 graphs for ONNX Runtime's CPU provider: which layers, how they are rounded, and the graph rewrite.

Each fully connected layer (a Gemm with constant weights) that is quantized becomes: a per-item (row) activation
scale, 7-bit activations stored as uint8 (0..127; signed inputs -63..63 shifted by 64), int8 weights with one
scale per output channel, an integer matmul (VNNI's u8 x s8 dot products) and a float rescale plus the fp32 bias.

- 7-bit activations, so the graph gives the same answer on every x86 CPU: without VNNI (AVX2, AVX-512 without
  VNNI) ONNX Runtime multiplies u8 x s8 with vpmaddubsw, which adds two products into a saturating int16, and
  255 x 127 x 2 overflows it (measured on an AVX2-only EPYC: errors of 0.7 on outputs of size 1 in
  tests/test_quantize.py). 127 x 127 x 2 = 32,258 fits, so the integer products are exact on every class.

- Per-item activation scales, not ONNX Runtime's per-batch ones (`quantize_dynamic`): an item's answer does not
  depend on the items it is batched with (the server merges requests), and they cost almost nothing in accuracy.
  On the shipped model (2,048 test items, k=64) per-row activations alone moved the mean NLL by under 0.002 nats
  in every layer; per-batch ones by up to 0.011.
- The weights are what cost nats, so they are rounded by GPTQ (Frantar et al. 2022, with its activation order):
  column by column, each rounding error is pushed onto the columns not yet rounded, weighted by the inverse
  Hessian X^T X of the layer's inputs on the model's own training data. On the shipped model's decoder output
  layer this took the NLL change from +0.038 (round to nearest) to +0.003 nats.
- Per layer, `export` keeps whichever rounding (GPTQ or nearest) measures fewer nats: on the encoder's first
  layer, whose inputs are binary pixels, round to nearest measured better.
- Which layers: `greedy_order` orders the layers by measured NLL cost per multiply-add saved; `export` adds them
  in that order, leaving out any that takes the set over the budget, and keeps the fastest set measured (the
  others stay fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NONNEGATIVE_OPS = ("Relu", "Sigmoid", "Softplus")  # producers whose outputs are >= 0: uint8 without a shift
GPTQ_DAMP = 0.1  # Hessian damping, as a fraction of its mean diagonal (0.1 measured better than 0.01 here)


@dataclass
class Layer:
    """One quantizable fully connected layer of a graph."""

    graph: str  # "encoder" or "decoder"
    node: str  # the Gemm node's name
    input: str  # the tensor it multiplies
    weight: np.ndarray  # (N, K) float32: output channels x inputs
    nonnegative: bool  # is its input >= 0 (after ReLU, or [0, 1] data)?

    @property
    def key(self) -> str:
        """Its name across both graphs, e.g. 'decoder/node_linear_2'."""
        return f"{self.graph}/{self.node}"

    @property
    def macs(self) -> int:
        """Multiply-adds per item."""
        return int(self.weight.size)


def layers(model: onnx.ModelProto, graph: str, unit_input: bool) -> list[Layer]:
    """The Gemm layers of a graph that can be quantized (constant weights and bias, alpha = beta = 1).
    `unit_input`: the graph's input is data in [0, 1] (the Bernoulli likelihoods' input rule)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    graph_inputs = {i.name for i in model.graph.input}
    found = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) != 3 or node.input[1] not in inits
                or node.input[2] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        w = w if attrs.get("transB", 0) else w.T
        src = producers.get(node.input[0])
        nonneg = (src is not None and src.op_type in NONNEGATIVE_OPS) or (node.input[0] in graph_inputs and unit_input)
        found.append(Layer(graph, node.name, node.input[0], np.ascontiguousarray(w), nonneg))
    return found


def layer_inputs(model: onnx.ModelProto, names: list[str], feed: np.ndarray, threads: int | None = None) -> dict:
    """What each named tensor holds when the graph runs on `feed` (the layers' calibration inputs)."""
    from ..modeldir import graphs

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in known)
    sess = graphs.make_session(probe, threads=threads)
    outs = sess.run(names, {sess.get_inputs()[0].name: feed})
    return dict(zip(names, outs, strict=True))


def gptq(w: np.ndarray, x: np.ndarray, damp: float = GPTQ_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Round weights w (N, K) to int8 with one symmetric scale per output channel, GPTQ-style against the layer's
    inputs x (n, K). Returns (q int8 (N, K), scale float32 (N,)); w ~= q * scale[:, None]."""
    W = w.astype(np.float64).copy()
    X = x.astype(np.float64)
    H = X.T @ X / max(len(X), 1)
    dead = np.diag(H) == 0  # inputs that are always 0 (an image's border): their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale = np.abs(W).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    order = np.argsort(-np.diag(H), kind="stable")  # the most active inputs first
    W, H = W[:, order], H[np.ix_(order, order)]
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    # upper Cholesky factor of H^-1: row i holds how the error of column i spreads to the columns after it
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    Q = np.empty(W.shape, np.int8)
    for i in range(W.shape[1]):
        q = np.clip(np.round(W[:, i] / scale), -127, 127)
        Q[:, i] = q
        err = (W[:, i] - q * scale) / U[i, i]
        W[:, i + 1:] -= np.outer(err, U[i, i + 1:])
    out = np.empty_like(Q)
    out[:, order] = Q
    return out, scale.astype(np.float32)


def rewrite(model: onnx.ModelProto, quantized: dict[str, tuple[np.ndarray, np.ndarray]],
            found: list[Layer]) -> onnx.ModelProto:
    """A copy of the graph with the named Gemm layers as per-item-scaled int8 matmuls (see the module docstring)."""
    by_name = {layer.node: layer for layer in found}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, inits = [], []
    const = {"ax": np.array([1], np.int64), "flat": np.array([-1], np.int64), "tiny": np.array(1e-30, np.float32),
             "u127": np.array(1 / 127, np.float32), "s63": np.array(1 / 63, np.float32),
             "c64": np.array(64, np.float32), "zp64": np.array(64, np.uint8), "one": np.array(1, np.float32)}
    inits += [numpy_helper.from_array(v, f"q8/{k}") for k, v in const.items()]
    for node in out.graph.node:
        if node.name not in quantized:
            nodes.append(node)
            continue
        layer, (q, scale) = by_name[node.name], quantized[node.name]
        p, x = f"q8/{node.name}", node.input[0]
        inits += [numpy_helper.from_array(np.ascontiguousarray(q.T), p + "/w"),  # (K, N) int8
                  numpy_helper.from_array(scale, p + "/w_scale")]
        if layer.nonnegative:  # x / s in 0..127 with s = row max / 127
            nodes += [helper.make_node("ReduceMax", [x, "q8/ax"], [p + "/max"], keepdims=1)]
            step, q_in, zp = "q8/u127", x, []
        else:  # x / s + 64 in 1..127 with s = row max |x| / 63, zero point 64
            nodes += [helper.make_node("Abs", [x], [p + "/abs"]),
                      helper.make_node("ReduceMax", [p + "/abs", "q8/ax"], [p + "/max"], keepdims=1)]
            step, q_in, zp = "q8/s63", p + "/shifted", ["q8/zp64"]
        nodes += [helper.make_node("Max", [p + "/max", "q8/tiny"], [p + "/m"]),  # an all-zero row: any scale
                  helper.make_node("Mul", [p + "/m", step], [p + "/s"]),  # (B, 1)
                  helper.make_node("Reshape", [p + "/s", "q8/flat"], [p + "/s_row"])]  # (B,)
        if not layer.nonnegative:
            nodes += [helper.make_node("Mul", [p + "/s", "q8/c64"], [p + "/shift"]),
                      helper.make_node("Add", [x, p + "/shift"], [q_in])]
        nodes += [helper.make_node("QuantizeLinear", [q_in, p + "/s_row"], [p + "/xq"], axis=0),  # uint8, per row
                  # integer product and per-channel rescale in one kernel (float (B, N)), then the row scale
                  helper.make_node("MatMulIntegerToFloat", [p + "/xq", p + "/w", "q8/one", p + "/w_scale", *zp],
                                   [p + "/y_row"], domain="com.microsoft"),
                  helper.make_node("Mul", [p + "/y_row", p + "/s"], [p + "/y"]),
                  helper.make_node("Add", [p + "/y", node.input[2]], [node.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    used = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def nearest(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round weights w (N, K) to the nearest int8 step, one symmetric scale per output channel."""
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)


ROUNDINGS = {"gptq": gptq, "nearest": lambda w, x: nearest(w)}  # (w, inputs) -> (q, scale)


def greedy_order(found: list[Layer], cost: dict[str, float]) -> list[Layer]:
    """The order in which `export` tries adding layers to the int8 set (one that takes the set over the budget is
    left out, and the next is tried): the decoder's layers first (a scoring job runs the decoder k times per
    encoder call: k=64 in tuning, 5,000 in `evaluate`), each graph's cheapest measured NLL cost per multiply-add
    first."""
    return sorted(found, key=lambda layer: (layer.graph != "decoder", max(cost[layer.key], 0.0) / layer.macs,
                                            -layer.macs))




