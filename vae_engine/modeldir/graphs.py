"""The ONNX graphs of a model directory: names, specs, variants, and safe loading.

One source of truth for what `export` writes and what the engine and `info` read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import DECODER_OUTPUTS, ModelConfig
from ..core.errors import ModelDirError, first_line, os_error_reason
from ..core.onnxwire import fields as _fields
from ..core.onnxwire import varints

ROLES = ("encoder", "decoder")
VARIANTS = {  # variant -> file suffix
    "fp32": ".onnx",  # the portable graph, validated against PyTorch
    "optimized": ".opt.onnx",  # ORT-optimized (may hold ORT-only fused ops), CPU provider
    "int8": ".int8.onnx",  # int8 layers within the accuracy budget (export/quantize.py, export/qdq.py)
    "fp16": ".fp16.onnx",  # half-precision weights and compute, fp32 inputs/outputs; for GPU providers
}
OPSET = 18

if TYPE_CHECKING:  # onnx costs 0.04-0.8 s to import: only rewriting or analysing a graph needs it
    import onnx


@dataclass(frozen=True)
class GraphSpec:
    """Input and output names of one graph, each (batch, features)."""

    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]


def spec(role: str, cfg: ModelConfig) -> GraphSpec:
    """The declared spec of the encoder (x -> mu, logvar) or decoder (z -> the likelihood's parameters) graph.

    x is an item flattened to D values in raw units (preprocessing is inside the graph); the decoder returns
    "logits" (D) for the Bernoulli likelihoods, "params" = [mean | logvar] (2D) for the Gaussian one.
    """
    if role == "encoder":
        return GraphSpec((("x", cfg.input_dim),), (("mu", cfg.latent_dim), ("logvar", cfg.latent_dim)))
    output, n_params = DECODER_OUTPUTS[cfg.likelihood]
    return GraphSpec((("z", cfg.latent_dim),), ((output, n_params * cfg.input_dim),))


def graph_path(model_dir: str | os.PathLike, role: str, variant: str = "fp32") -> Path:
    """Where a graph variant lives in a model directory, e.g. decoder.int8.onnx."""
    return Path(model_dir) / f"{role}{VARIANTS[variant]}"


ALLOWED_DOMAINS = ("", "ai.onnx", "com.microsoft")  # what export, ORT's optimizer and its int8 quantizer emit
MAX_DEPTH = 16  # subgraphs nested deeper are refused (exports nest a few levels; protobuf parses ~33 at most)


@dataclass(frozen=True)
class Graph:
    """A checked graph file: its bytes (what the runtimes are given), its inputs and outputs with their dims, its
    metadata, and its top-level nodes and initializers' shapes (what counting its work reads). Read from the
    protobuf wire format without importing onnx; `proto()` parses it with onnx for the few uses that rewrite a
    graph or infer its shapes."""

    path: Path
    data: bytes
    inputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    outputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    metadata: dict[str, str]
    nodes: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]  # top-level (op_type, inputs, outputs)
    initializer_dims: dict[str, tuple[int, ...]]  # top-level initializers' shapes

    @property
    def op_types(self) -> frozenset[str]:
        """The operators of the top-level graph."""
        return frozenset(op for op, _, _ in self.nodes)

    def proto(self) -> onnx.ModelProto:
        import onnx

        return onnx.load_model_from_string(self.data)

    @classmethod
    def of(cls, model: onnx.ModelProto, name: str) -> Graph:
        """A graph made in memory from checked ones (the fused and mean graphs), described the same way."""
        return inspect(model.SerializeToString(), Path(name))


def _text(value) -> str:
    return bytes(value).decode("utf-8", "replace")


class _Walk:
    """One pass over a ModelProto's bytes that refuses external data anywhere (every graph, subgraphs of
    If/Loop/Scan at any depth, functions and their default attributes, training graphs, sparse and attribute
    tensors) and operators from domains the project's own export never produces. Field numbers are onnx.proto's;
    a message field with the wrong wire type, or a second top-level graph (which protobuf would merge into the
    first), is refused as corrupt."""

    def __init__(self, path: Path, local_functions: set[tuple[str, str]]):
        self.path, self.name, self.local = path, str(path), local_functions

    def fields(self, buf):
        return _fields(buf, self.name)

    def message(self, wire: int, value):
        if wire != 2:
            raise ModelDirError(f"{self.path}: corrupt or truncated ONNX file (a message field of wire type {wire})")
        return value

    def tensor(self, buf) -> tuple[str, tuple[int, ...]]:  # TensorProto: dims 1, name 8, external_data 13,
        name, dims = "", []                                    # data_location 14
        for field, wire, value in self.fields(buf):
            if field == 8 and wire == 2:
                name = _text(value)
            elif field == 1 and wire == 0:
                dims.append(value)
            elif field == 1 and wire == 2:  # packed
                dims += varints(value, self.name)
            elif field == 13 or (field == 14 and value != 0):
                raise ModelDirError(f"{self.path}: tensor {name!r} refers to external data; refusing to load it "
                                    "(self-contained graphs only)")
        return name, tuple(dims)

    def sparse(self, buf) -> None:  # SparseTensorProto: values 1, indices 2
        for field, wire, value in self.fields(buf):
            if field in (1, 2):
                self.tensor(self.message(wire, value))

    def attribute(self, buf, depth: int) -> None:  # t 5, tensors 10; g 6, graphs 11; sparse_tensor(s) 22, 23
        for field, wire, value in self.fields(buf):
            if field in (5, 10):
                self.tensor(self.message(wire, value))
            elif field in (6, 11):
                self.graph(self.message(wire, value), depth + 1)
            elif field in (22, 23):
                self.sparse(self.message(wire, value))

    def nodes(self, bufs, depth: int) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """NodeProto: input 1, output 2, op_type 4, attribute 5, domain 7. Returns (op_type, inputs, outputs)."""
        out = []
        for buf in bufs:
            op, domain, attributes, io = "", "", [], ([], [])
            for field, wire, value in self.fields(buf):
                if field in (1, 2) and wire == 2:
                    io[field - 1].append(_text(value))
                elif field == 4 and wire == 2:
                    op = _text(value)
                elif field == 7 and wire == 2:
                    domain = _text(value)
                elif field == 5:
                    attributes.append(self.message(wire, value))
            if domain not in ALLOWED_DOMAINS and (domain, op) not in self.local:
                raise ModelDirError(f"{self.path}: operator {domain}::{op} is from a domain this project never "
                                    f"exports ({', '.join(repr(d) for d in ALLOWED_DOMAINS)}); refusing to load it")
            out.append((op, tuple(io[0]), tuple(io[1])))
            for attribute in attributes:
                self.attribute(attribute, depth)
        return out

    def graph(self, buf, depth: int = 0) -> dict:
        """GraphProto: node 1, initializer 5, input 11, output 12, sparse_initializer 15. Returns the top-level
        parts the spec check reads."""
        if depth > MAX_DEPTH:
            raise ModelDirError(f"{self.path}: subgraphs nested more than {MAX_DEPTH} deep; refusing to load it")
        parts: dict = {"nodes": [], "initializers": {}, "inputs": [], "outputs": []}
        for field, wire, value in self.fields(buf):
            if field == 1:
                parts["nodes"].append(self.message(wire, value))
            elif field == 5:
                name, dims = self.tensor(self.message(wire, value))
                parts["initializers"][name] = dims
            elif field == 15:
                self.sparse(self.message(wire, value))
            elif field in (11, 12):
                parts["inputs" if field == 11 else "outputs"].append(self.message(wire, value))
        parts["nodes"] = self.nodes(parts["nodes"], depth)
        return parts

    def function(self, buf) -> None:  # FunctionProto: node 7, attribute_proto 11 (default values)
        for field, wire, value in self.fields(buf):
            if field == 7:
                self.nodes([self.message(wire, value)], 0)
            elif field == 11:
                self.attribute(self.message(wire, value), 0)

    def value_info(self, buf) -> tuple[str, tuple[int | str, ...]]:
        """ValueInfoProto (name 1, type 2) -> (name, dims): TypeProto.tensor_type 1 -> shape 2 -> dim 1 ->
        dim_value 1 (int64) | dim_param 2."""
        name, dims = "", []
        for field, wire, value in self.fields(buf):
            if field == 1 and wire == 2:
                name = _text(value)
            elif field == 2 and wire == 2:
                for f, w, tensor_type in self.fields(value):
                    if f != 1 or w != 2:
                        continue
                    for f2, w2, shape in self.fields(tensor_type):
                        if f2 != 2 or w2 != 2:
                            continue
                        for f3, w3, dim in self.fields(shape):
                            if f3 == 1 and w3 == 2:
                                got: int | str = ""
                                for f4, w4, v in self.fields(dim):
                                    if f4 == 1 and w4 == 0:
                                        got = v - (1 << 64) if v >= 1 << 63 else v
                                    elif f4 == 2 and w4 == 2:
                                        got = _text(v)
                                dims.append(got)
        return name, tuple(dims)


MODEL_GRAPH, MODEL_METADATA, MODEL_TRAINING, MODEL_FUNCTIONS = 7, 14, 20, 25  # onnx.proto's ModelProto fields


def inspect(data: bytes, path: Path) -> Graph:
    """Check a graph file's bytes (see `_Walk`) and describe it, without onnx."""
    buf = memoryview(data)
    top: dict[int, list] = {}
    for field, wire, value in _fields(buf, str(path)):
        top.setdefault(field, []).append((wire, value))
    walk = _Walk(path, set())
    functions = [walk.message(w, v) for w, v in top.get(MODEL_FUNCTIONS, [])]
    for function in functions:  # FunctionProto: name 1, domain 10
        entry = {f: _text(v) for f, w, v in walk.fields(function) if f in (1, 10) and w == 2}
        walk.local.add((entry.get(10, ""), entry.get(1, "")))
    graphs = top.get(MODEL_GRAPH, [])
    if not graphs:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file (no graph)")
    if len(graphs) > 1:
        raise ModelDirError(f"{path}: corrupt ONNX file (the graph field appears {len(graphs)} times)")
    parts = walk.graph(walk.message(*graphs[0]))
    for function in functions:
        walk.function(function)
    for wire, value in top.get(MODEL_TRAINING, []):  # TrainingInfoProto: initialization 1, algorithm 2 (graphs)
        for field, w, v in walk.fields(walk.message(wire, value)):
            if field in (1, 2):
                walk.graph(walk.message(w, v), 1)
    if not parts["nodes"]:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file (empty graph)")
    metadata = {}
    for wire, value in top.get(MODEL_METADATA, []):  # StringStringEntryProto: key 1, value 2
        entry = {f: _text(v) for f, w, v in walk.fields(walk.message(wire, value)) if w == 2}
        metadata[entry.get(1, "")] = entry.get(2, "")
    inputs = tuple(v for v in map(walk.value_info, parts["inputs"]) if v[0] not in parts["initializers"])
    return Graph(path, bytes(data), inputs, tuple(map(walk.value_info, parts["outputs"])), metadata,
                 tuple(parts["nodes"]), parts["initializers"])


def load_graph(path: str | os.PathLike, role: str, cfg: ModelConfig) -> Graph:
    """Read an ONNX file safely and check it against the model config, without importing onnx.

    Refuses external data (a data location outside the model folder is a known path-traversal class,
    CVE-2022-25882 and CVE-2024-27318), operators from foreign domains, and any input/output whose name or shape
    differs from the spec. The runtimes are then given the checked bytes, never the path.
    """
    path = Path(path)
    graph = inspect(_read(path), path)
    want = spec(role, cfg)
    for kind, got, expected in (("input", graph.inputs, want.inputs), ("output", graph.outputs, want.outputs)):
        names = [name for name, _ in got]
        if names != [n for n, _ in expected]:
            raise ModelDirError(f"{path}: {kind}s {names} do not match the {role} spec {[n for n, _ in expected]}")
        for (name, dims), (_, features) in zip(got, expected, strict=True):
            if len(dims) != 2 or dims[1] != features:
                raise ModelDirError(
                    f"{path}: {kind} {name!r} has shape {list(dims)}, but config.json needs (batch, {features}); "
                    "re-export the model")
    return graph


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; run `vae-engine export {path.parent}` first")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read the ONNX file: {os_error_reason(exc)}") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A graph file's metadata_props (what `info` shows), from the same checked wire-format read as `load_graph`."""
    path = Path(path)
    return inspect(_read(path), path).metadata


def providers_for(device: str) -> list[str]:
    """Execution providers for a device, always ending in CPU so a missing GPU falls back instead of failing."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = {"cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider"], "cpu": []}.get(device.split(":")[0], [])
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def make_session(model: Graph | onnx.ModelProto | bytes, threads: int | None = None, device: str = "cpu",
                 spin: bool = False, optimized_path: str | None = None, name: str | None = None):
    """An ONNX Runtime session from an in-memory graph (never a path, so no external data can be pulled in).

    intra-op threads = `threads`; one inter-op thread; spinning off by default, because spinning ORT workers
    keep cores busy after each run and slow down Numba and torch work in the same process.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    data = model.data if isinstance(model, Graph) else model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers_for(device))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented classes for bad graphs
        first = first_line(exc)
        raise ModelDirError(f"{name or 'graph'}: ONNX Runtime cannot load it ({first[:300]}); "
                            "re-export the model") from None


INT8_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul")  # this module's and ORT's quantizer's


def graph_macs(graph: Graph) -> dict[str, int]:
    """Multiply-adds per item of a graph's matrix products and convolutions with constant weights, by the precision
    they run in: {"int8": ..., "float": ...} (Gemm, MatMul, Conv, ConvTranspose, and the integer products of int8
    graphs). Matrix products are counted from the wire-format read; convolutions take their spatial sizes from
    ONNX shape inference (batch 1, the one use of onnx here), so no framework is needed to count the work of an
    exported model."""
    shapes = graph.initializer_dims or {}
    out = {"int8": 0, "float": 0}
    spatial: dict[str, tuple[int, ...]] = {}
    if any(op in ("Conv", "ConvTranspose") for op, _, _ in graph.nodes):  # the activations' shapes, batch 1
        import onnx

        fixed = graph.proto()
        for value in fixed.graph.input:
            dims = value.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_value = 1
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph  # through Shape->Reshape
        for value in (*inferred.value_info, *inferred.input, *inferred.output):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                spatial[value.name] = tuple(d.dim_value for d in dims)
    for op, inputs, outputs in graph.nodes:
        if len(inputs) < 2 or inputs[1] not in shapes:
            continue
        dims = shapes[inputs[1]]
        if op in ("Gemm", "MatMul", *INT8_OPS) and len(dims) == 2:
            out["int8" if op in INT8_OPS else "float"] += int(dims[0] * dims[1])
        elif op in ("Conv", "ConvTranspose") and len(dims) >= 3:
            # weights (Cout, Cin/g, k...) for Conv, (Cin, Cout/g, k...) for ConvTranspose: each weight is one
            # multiply-add per output position of a Conv, per input position of a ConvTranspose
            where = spatial.get(outputs[0] if op == "Conv" else inputs[0])
            if where is not None:
                out["float"] += int(math.prod(dims) * math.prod(where[2:]))
    return out
