"""int8 layers: the graph rewrite against a NumPy twin, batch invariance, GPTQ against round-to-nearest, and the
order in which export tries layer sets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vae_engine.export import quantize
from vae_engine.modeldir import graphs


def _mlp(w1, b1, w2, b2, first_relu: bool = False) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm -> y (weights (N, K), transB=1, as torch exports Linear)."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"),
                                                                          (b2, "b2"))]
    nodes = ([helper.make_node("Relu", ["x"], ["x0"])] if first_relu else []) + [
        helper.make_node("Gemm", ["x0" if first_relu else "x", "w1", "b1"], ["h"], name="g1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w1.shape[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", w2.shape[0]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])


def _run(model, x):
    return graphs.make_session(model, threads=1).run(None, {"x": x})[0]


def _int8_layer_twin(x, q, scale, b, nonnegative):
    """NumPy twin of one rewritten layer: per-row scale, round half to even, integer product, rescale, bias."""
    x = x.astype(np.float64)
    if nonnegative:
        s = np.maximum(x.max(1, keepdims=True), 1e-30) / 127
        xq, zp = np.clip(np.round(x / s), 0, 127), 0
    else:
        s = np.maximum(np.abs(x).max(1, keepdims=True), 1e-30) / 63
        xq, zp = np.clip(np.round((x + 64 * s) / s), 0, 127), 64
    acc = (xq - zp) @ q.astype(np.float64).T
    return acc * s * scale[None, :] + b


@pytest.fixture()
def net():
    g = np.random.default_rng(0)
    return g.normal(0, 0.3, (24, 16)), g.normal(0, 0.1, 24), g.normal(0, 0.3, (10, 24)), g.normal(0, 0.1, 10)


def test_layers_found_with_their_input_signs(net):
    model = _mlp(*net)
    found = quantize.layers(model, "encoder", unit_input=False)
    assert [(ly.node, ly.input, ly.nonnegative, ly.weight.shape) for ly in found] == [
        ("g1", "x", False, (24, 16)), ("g2", "r", True, (10, 24))]
    assert quantize.layers(model, "encoder", unit_input=True)[0].nonnegative  # [0, 1] data: no shift
    np.testing.assert_array_equal(found[1].weight, net[2].astype(np.float32))


def test_rewrite_matches_numpy_twin(net):
    w1, b1, w2, b2 = net
    model = _mlp(*net)
    found = quantize.layers(model, "encoder", unit_input=False)
    q1, s1 = quantize.nearest(found[0].weight)
    q2, s2 = quantize.nearest(found[1].weight)
    x = np.random.default_rng(1).normal(0, 1, (7, 16)).astype(np.float32)
    x[3] = 0  # an all-zero row
    got = _run(quantize.rewrite(model, {"g1": (q1, s1), "g2": (q2, s2)}, found), x)
    h = np.maximum(_int8_layer_twin(x, q1, s1, b1, nonnegative=False), 0)
    want = _int8_layer_twin(h.astype(np.float32), q2, s2, b2, nonnegative=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and it is an approximation of the float network
    ref = _run(model, x)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    only_second = _run(quantize.rewrite(model, {"g2": (q2, s2)}, found), x)  # the other layer stays fp32
    h32 = np.maximum(x.astype(np.float64) @ w1.T + b1, 0)
    np.testing.assert_allclose(only_second, _int8_layer_twin(h32.astype(np.float32), q2, s2, b2, True),
                               rtol=1e-4, atol=1e-4)


def test_activations_stay_7_bit_so_no_cpu_class_saturates(net):
    """Without VNNI, ONNX Runtime's u8 x s8 product adds pairs of products into a saturating int16: activations
    up to 255 against weights of 127 overflow it (seen on AVX2-only CPUs). The graph's uint8 activations must
    stay within 0..127 whatever the input, so 2 x 127 x 127 fits and every CPU class computes the same."""
    model = _mlp(*net)
    found = quantize.layers(model, "encoder", unit_input=False)
    q = quantize.rewrite(model, {ly.node: quantize.nearest(ly.weight) for ly in found}, found)
    xq = [n.output[0] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert len(xq) == 2
    q.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None) for name in xq)
    g = np.random.default_rng(2)
    x = np.concatenate([g.normal(0, 1, (50, 16)), g.normal(0, 1e4, (5, 16)), np.full((2, 16), -3.0),
                        np.zeros((1, 16))]).astype(np.float32)
    outs = graphs.make_session(q, threads=1).run(xq, {"x": x})
    assert max(int(o.max()) for o in outs) == 127 and min(int(o.min()) for o in outs) >= 0


def test_an_items_answer_does_not_depend_on_its_batch(net):
    """Per-item activation scales: adding a large item to the batch leaves the others' outputs bit-identical
    (ONNX Runtime's dynamic quantization takes one scale per batch, so its answers move)."""
    model = _mlp(*net)
    found = quantize.layers(model, "encoder", unit_input=False)
    int8 = quantize.rewrite(model, {ly.node: quantize.nearest(ly.weight) for ly in found}, found)
    x = np.random.default_rng(2).normal(0, 1, (5, 16)).astype(np.float32)
    alone = _run(int8, x)
    batch = _run(int8, np.concatenate([x, 50 * x[:1]]))
    np.testing.assert_array_equal(batch[:5], alone)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = np.random.default_rng(3)
    x = g.normal(0, 1, (2000, 6)) @ g.normal(0, 1, (6, 48))  # 48 inputs spanning 6 directions
    x = (x + 0.05 * g.normal(0, 1, x.shape)).astype(np.float32)
    w = g.normal(0, 1, (32, 48)).astype(np.float32)
    for fn in (quantize.gptq, lambda w, x: quantize.nearest(w)):
        q, s = fn(w, x)
        assert q.dtype == np.int8 and s.shape == (32,) and np.abs(q).max() <= 127
    err = {name: np.mean((x @ (w - q * s[:, None]).T) ** 2) for name, (q, s) in
           (("gptq", quantize.gptq(w, x)), ("nearest", quantize.nearest(w)))}
    assert err["gptq"] < 0.5 * err["nearest"]
    q, s = quantize.gptq(w, np.zeros_like(x))  # inputs that are always 0: their weights do not matter
    assert np.all(q == 0)


def test_greedy_order_decoder_first_cheapest_per_multiply_add():
    def layer(graph, node, n):
        return quantize.Layer(graph, node, "x", np.zeros((n, 10), np.float32), True)

    e, d1, d2 = layer("encoder", "a", 100), layer("decoder", "b", 100), layer("decoder", "c", 10)
    cost = {e.key: 0.0, d1.key: 0.01, d2.key: 0.0005}  # per MAC: d2 5e-7, d1 1e-5
    assert [ly.key for ly in quantize.greedy_order([e, d1, d2], cost)] == ["decoder/c", "decoder/b", "encoder/a"]


def test_macs_by_precision(net):
    model = _mlp(*net)
    found = quantize.layers(model, "encoder", unit_input=False)
    def macs(m):
        return graphs.graph_macs(graphs.Graph.of(m, "graph"))

    assert macs(model) == {"int8": 0, "float": 24 * 16 + 10 * 24}
    int8 = quantize.rewrite(model, {"g2": quantize.nearest(found[1].weight)}, found)
    assert macs(int8) == {"int8": 10 * 24, "float": 24 * 16}
