"""The graph safety check (`graphs.load_graph`, a protobuf wire-format walk without onnx) against its twin built on
onnx's own parser, over a corpus of hostile graphs: external data and foreign operators hidden wherever ONNX can
hold them. Both must refuse the same graphs; the wire walk must describe a good graph as onnx does, and give a
ModelDirError (never another exception) for damaged bytes."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vae_engine import modeldir
from vae_engine.core.errors import ModelDirError
from vae_engine.modeldir import graphs

from .conftest import TINY_EXPORTED

CFG = modeldir.model_config(TINY_EXPORTED)
DECODER = onnx.load(graphs.graph_path(TINY_EXPORTED, "decoder"))


# ---- the twin: the same rules on onnx's parsed ModelProto ----

def _tensors_of(attr: onnx.AttributeProto) -> list:
    sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
    return ([attr.t] if attr.HasField("t") else []) + list(attr.tensors) + [t for s in sparse
                                                                            for t in (s.values, s.indices)]


def _node_tensors(nodes, local: set) -> list:
    tensors = []
    for node in nodes:
        if node.domain not in graphs.ALLOWED_DOMAINS and (node.domain, node.op_type) not in local:
            raise ValueError("domain")
        for attr in node.attribute:
            tensors += _tensors_of(attr)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                tensors += _graph_tensors(sub, local)
    return tensors


def _graph_tensors(graph: onnx.GraphProto, local: set) -> list:
    tensors = list(graph.initializer) + [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    return tensors + _node_tensors(graph.node, local)


def twin_refuses(model: onnx.ModelProto) -> bool:
    local = {(f.domain, f.name) for f in model.functions}
    try:
        tensors = _graph_tensors(model.graph, local)
        for f in model.functions:
            tensors += _node_tensors(f.node, local)
            for attr in f.attribute_proto:
                tensors += _tensors_of(attr)
        for info in model.training_info:
            tensors += _graph_tensors(info.initialization, local) + _graph_tensors(info.algorithm, local)
    except ValueError:
        return True
    return any(t.data_location == TensorProto.EXTERNAL or len(t.external_data) for t in tensors)


def wire_refuses(model: onnx.ModelProto, tmp_path) -> bool:
    path = tmp_path / "decoder.onnx"
    path.write_bytes(model.SerializeToString())
    try:
        graphs.load_graph(path, "decoder", CFG)
    except ModelDirError as exc:
        assert "external data" in str(exc) or "domain" in str(exc), exc
        return True
    return False


# ---- the corpus ----

def _external(name: str, how: str = "both") -> TensorProto:
    t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    if how in ("both", "location"):
        t.data_location = TensorProto.EXTERNAL
    if how in ("both", "entries"):
        t.external_data.add(key="location", value="../../../../etc/passwd")
    return t


def _copy() -> onnx.ModelProto:
    return onnx.ModelProto.FromString(DECODER.SerializeToString())


def _if_node(branch: onnx.GraphProto, model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["leak_out"], then_branch=branch, else_branch=branch))


def _branch(nodes=(), initializers=(), sparse=()) -> onnx.GraphProto:
    out = helper.make_tensor_value_info("leak", TensorProto.FLOAT, [1])
    nodes = list(nodes) or [helper.make_node("Constant", [], ["leak"], value_float=0.0)]
    g = helper.make_graph(nodes, "branch", [], [out], list(initializers))
    g.sparse_initializer.extend(sparse)
    return g


def _sparse(t: TensorProto):
    return helper.make_sparse_tensor(t, helper.make_tensor("i", TensorProto.INT64, [1], [0]), [1])


def corpus() -> dict[str, onnx.ModelProto]:
    cases = {}

    def case(name):
        def add(build):
            model = _copy()
            build(model)
            cases[name] = model
        return add

    case("clean")(lambda m: None)
    case("initializer, location and entries")(lambda m: m.graph.initializer.append(_external("x")))
    case("initializer, location only")(lambda m: m.graph.initializer.append(_external("x", "location")))
    case("initializer, entries only")(lambda m: m.graph.initializer.append(_external("x", "entries")))
    case("sparse initializer")(lambda m: m.graph.sparse_initializer.append(_sparse(_external("x"))))
    case("Constant value")(lambda m: m.graph.node.append(helper.make_node("Constant", [], ["c"], value=_external("c"))))
    case("attribute tensors list")(lambda m: m.graph.node.append(helper.make_node(
        "Identity", ["z"], ["c"], stash=[helper.make_tensor("ok", TensorProto.FLOAT, [1], [1.0]), _external("c")])))
    case("sparse attribute")(lambda m: m.graph.node.append(helper.make_node(
        "Constant", [], ["c"], sparse_value=_sparse(_external("c")))))
    case("If branch initializer")(lambda m: _if_node(_branch(initializers=[_external("e")]), m))
    case("If branch sparse")(lambda m: _if_node(_branch(sparse=[_sparse(_external("e"))]), m))
    case("If branch Constant")(lambda m: _if_node(_branch(
        [helper.make_node("Constant", [], ["leak"], value=_external("e"))]), m))

    def nested(m):  # an If inside an If's branch, the tensor two levels down
        inner = helper.make_node("If", ["cond"], ["leak"], then_branch=_branch(initializers=[_external("deep")]),
                                 else_branch=_branch())
        _if_node(_branch([inner]), m)
    case("nested If")(nested)

    def function(m, where: str, domain: str = "ai.onnx"):
        body = [helper.make_node("Constant", [], ["y"], value=_external("f") if where == "node" else
                                 helper.make_tensor("ok", TensorProto.FLOAT, [1], [1.0]),
                                 domain="evil.ops" if where == "domain" else "")]
        f = helper.make_function("local.fn", "Leak", [], ["y"], body, [helper.make_opsetid("", graphs.OPSET)])
        if where == "default":
            f.attribute_proto.append(helper.make_attribute("w", _external("d")))
        m.functions.append(f)
        m.graph.node.append(helper.make_node("Leak", [], ["f_out"], domain="local.fn"))
    case("function body")(lambda m: function(m, "node"))
    case("function default attribute")(lambda m: function(m, "default"))
    case("function body, foreign domain")(lambda m: function(m, "domain"))
    case("local function (allowed)")(lambda m: function(m, "none"))
    case("foreign domain")(lambda m: m.graph.node.append(helper.make_node("Run", [], ["o"], domain="evil.ops")))
    case("foreign domain in a branch")(lambda m: _if_node(_branch(
        [helper.make_node("Run", [], ["leak"], domain="evil.ops")]), m))

    def training(m):
        info = m.training_info.add()
        info.initialization.CopyFrom(_branch(initializers=[_external("t")]))
    case("training_info")(training)
    return cases


CORPUS = corpus()


@pytest.mark.parametrize("name", list(CORPUS))
def test_wire_check_refuses_what_the_onnx_twin_refuses(name, tmp_path):
    model = CORPUS[name]
    expected = name not in ("clean", "local function (allowed)")
    assert twin_refuses(model) == expected, "the twin itself"
    assert wire_refuses(model, tmp_path) == expected


def test_wire_description_equals_onnx(tmp_path):
    for path in sorted(TINY_EXPORTED.glob("*.onnx")):
        role = path.name.split(".")[0]
        got = graphs.load_graph(path, role, CFG)
        model = onnx.load(path)
        inits = {t.name for t in model.graph.initializer}

        def dims(v):
            return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                         for d in v.type.tensor_type.shape.dim)
        assert got.inputs == tuple((v.name, dims(v)) for v in model.graph.input if v.name not in inits)
        assert got.outputs == tuple((v.name, dims(v)) for v in model.graph.output)
        assert got.op_types == frozenset(n.op_type for n in model.graph.node)
        assert got.nodes == tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)
        assert got.initializer_dims == {t.name: tuple(t.dims) for t in model.graph.initializer}
        assert got.metadata == {p.key: p.value for p in model.metadata_props}
        assert got.data == path.read_bytes()
        assert got.proto() == model


def test_spliced_mean_graph_equals_onnx_built(tmp_path):
    """`onnxwire.append_to_graph` (the decode-mean graph, made without onnx) is the graph onnx builds: a valid
    model (onnx.checker) with the same nodes and the new output."""
    from vae_engine.core import onnxwire
    from vae_engine.model import likelihoods

    nodes = likelihoods.get("bernoulli").mean_onnx("logits", "mean", 784)
    data = onnxwire.append_to_graph(DECODER.SerializeToString(), nodes, [onnxwire.output("mean", ("batch", 784))],
                                    "decoder")
    got = onnx.load_model_from_string(data)
    want = _copy()
    want.graph.node.extend(onnx.NodeProto.FromString(n) for n in nodes)
    want.graph.ClearField("output")
    want.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 784]))
    onnx.checker.check_model(got, full_check=True)
    assert got == want
    assert graphs.inspect(data, tmp_path / "mean").outputs == (("mean", ("batch", 784)),)


def test_gemm_probe_graphs_are_valid_onnx():
    """The peak probe's one-node graphs (perf.peaks, encoded by onnxwire) pass onnx's checker as onnx builds them."""
    from vae_engine.perf import peaks

    for types, op in (((TensorProto.FLOAT, TensorProto.FLOAT), "MatMul"), ((TensorProto.UINT8, TensorProto.INT8),
                                                                         "MatMulInteger")):
        got = onnx.load_model_from_string(peaks._onnx_gemm(8, *types, op))
        onnx.checker.check_model(got, full_check=True)
        out = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
        want = helper.make_model(helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["c"])], "graph",
            [helper.make_tensor_value_info("a", types[0], [8, 8]),
             helper.make_tensor_value_info("b", types[1], [8, 8])],
            [helper.make_tensor_value_info("c", out, [8, 8])]),
            opset_imports=[helper.make_opsetid("", graphs.OPSET)], ir_version=8)
        assert got.graph == want.graph and got.ir_version == 8 and got.opset_import == want.opset_import


def test_graph_field_twice_is_refused(tmp_path):
    """Protobuf merges a repeated singular field: a second graph would add nodes the first check never saw."""
    extra = onnx.ModelProto()
    extra.graph.node.append(helper.make_node("Run", [], ["o"], domain="evil.ops"))
    path = tmp_path / "decoder.onnx"
    path.write_bytes(DECODER.SerializeToString() + extra.SerializeToString())
    with pytest.raises(ModelDirError, match="graph field appears 2 times"):
        graphs.load_graph(path, "decoder", CFG)


def test_deep_nesting_is_refused_not_a_crash(tmp_path):
    branch = _branch()
    for _ in range(graphs.MAX_DEPTH + 4):
        branch = _branch([helper.make_node("If", ["cond"], ["leak"], then_branch=branch, else_branch=_branch())])
    model = _copy()
    _if_node(branch, model)
    path = tmp_path / "decoder.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelDirError, match="nested more than"):
        graphs.load_graph(path, "decoder", CFG)


def test_damaged_bytes_give_a_model_dir_error(tmp_path):
    """Truncations and random byte changes: a ModelDirError or a graph that reads, never another exception."""
    raw = graphs.graph_path(TINY_EXPORTED, "decoder").read_bytes()
    rng = random.Random(0)
    path = tmp_path / "decoder.onnx"
    variants = [raw[:n] for n in range(0, len(raw), max(1, len(raw) // 97))]
    for _ in range(300):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        variants.append(bytes(b))
    for data in variants:
        path.write_bytes(data)
        try:
            graphs.load_graph(path, "decoder", CFG)
        except ModelDirError:
            pass
