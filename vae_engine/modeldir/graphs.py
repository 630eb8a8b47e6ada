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

ROLES = ("encoder", "decoder")
VARIANTS = {  # variant -> file suffix
    "fp32": ".onnx",  # the portable graph, validated against PyTorch
    "optimized": ".opt.onnx",  # ORT-optimized (may hold ORT-only fused ops), CPU provider
    "int8": ".int8.onnx",  # dynamically quantized weights (onnxruntime.quantization)
    "fp16": ".fp16.onnx",  # half-precision weights and compute, fp32 inputs/outputs; for GPU providers
}
OPSET = 18

if TYPE_CHECKING:  # onnx costs 0.2-0.8 s to import: only loading a graph needs it (`info` reads metadata without)
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


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


ALLOWED_DOMAINS = ("", "ai.onnx", "com.microsoft")  # what export, ORT's optimizer and its int8 quantizer emit


def _tensors_of(attr: onnx.AttributeProto) -> list[onnx.TensorProto]:
    sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
    sparse += list(attr.sparse_tensors)
    return ([attr.t] if attr.HasField("t") else []) + list(attr.tensors) + \
        [t for s in sparse for t in (s.values, s.indices)]


def _subgraphs_of(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _check_nodes(nodes, local_functions: set[tuple[str, str]], path: Path) -> list[onnx.TensorProto]:
    """Check every node's operator domain, recurse into subgraphs; return every tensor found on the way."""
    tensors: list[onnx.TensorProto] = []
    for node in nodes:
        if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in local_functions:
            raise ModelDirError(f"{path}: operator {node.domain}::{node.op_type} is from a domain this project "
                                f"never exports ({', '.join(repr(d) for d in ALLOWED_DOMAINS)}); refusing to load it")
        for attr in node.attribute:
            tensors += _tensors_of(attr)
            for sub in _subgraphs_of(attr):
                tensors += _graph_tensors(sub, local_functions, path)
    return tensors


def _graph_tensors(graph: onnx.GraphProto, local_functions: set[tuple[str, str]], path: Path) -> list:
    tensors = list(graph.initializer)
    tensors += [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    return tensors + _check_nodes(graph.node, local_functions, path)


def check_contents(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external data anywhere (every graph, subgraphs of If/Loop/Scan, functions, sparse and attribute
    tensors) and operators from domains the project's own export never produces."""
    import onnx

    local = {(f.domain, f.name) for f in model.functions}
    tensors = _graph_tensors(model.graph, local, path)
    for function in model.functions:
        tensors += _check_nodes(function.node, local, path)
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise ModelDirError(f"{path}: tensor {t.name!r} refers to external data; refusing to load it "
                                "(self-contained graphs only)")


def load_graph(path: str | os.PathLike, role: str, cfg: ModelConfig) -> onnx.ModelProto:
    """Parse an ONNX file safely and check it against the model config.

    Refuses external data (a data location outside the model folder is a known path-traversal class,
    CVE-2022-25882 and CVE-2024-27318) and any input/output whose name or shape differs from the spec.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    raw = _read(path)
    try:
        model = onnx.load_model_from_string(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file ({type(exc).__name__})") from None
    if not model.graph.node:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file (empty graph)")
    check_contents(model, path)
    want = spec(role, cfg)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    for kind, got, expected in (("input", inputs, want.inputs), ("output", model.graph.output, want.outputs)):
        names = [v.name for v in got]
        if names != [n for n, _ in expected]:
            raise ModelDirError(f"{path}: {kind}s {names} do not match the {role} spec {[n for n, _ in expected]}")
        for value, (name, features) in zip(got, expected, strict=True):
            dims = _dims(value)
            if len(dims) != 2 or dims[1] != features:
                raise ModelDirError(
                    f"{path}: {kind} {name!r} has shape {dims}, but config.json needs (batch, {features}); "
                    "re-export the model")
    return model


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The metadata_props of a graph as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; run `vae-engine export {path.parent}` first")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read the ONNX file: {os_error_reason(exc)}") from None


def _fields(buf: memoryview, name: str):
    """(field number, wire type, value) of each field of one protobuf message: an int for varints and fixed-size
    fields, a memoryview for length-delimited ones (never copied). Malformed bytes are a ModelDirError."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= n or shift > 63:
                raise ModelDirError(f"{name}: corrupt or truncated ONNX file (bad varint)")
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while i < n:
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value = varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > n:
                raise ModelDirError(f"{name}: corrupt or truncated ONNX file")
            value, i = int.from_bytes(buf[i:i + size], "little"), i + size
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ModelDirError(f"{name}: corrupt or truncated ONNX file (a field runs past the end)")
            value, i = buf[i:i + size], i + size
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise ModelDirError(f"{name}: corrupt or truncated ONNX file (wire type {wire})")
        yield field, wire, value


MODEL_GRAPH, MODEL_METADATA = 7, 14  # onnx.proto: ModelProto.graph, ModelProto.metadata_props (key 1, value 2)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A graph file's metadata_props, read from the protobuf wire format without importing onnx or parsing the
    graph (what `info` shows). It checks nothing else: every graph is fully checked by `load_graph` before use."""
    path = Path(path)
    buf = memoryview(_read(path))
    out, graph = {}, False
    for field, wire, value in _fields(buf, str(path)):
        graph |= field == MODEL_GRAPH and wire == 2
        if field == MODEL_METADATA and wire == 2:
            entry = {f: bytes(v).decode("utf-8", "replace") for f, w, v in _fields(value, str(path)) if w == 2}
            out[entry.get(1, "")] = entry.get(2, "")
    if not graph:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file (no graph)")
    return out


def providers_for(device: str) -> list[str]:
    """Execution providers for a device, always ending in CPU so a missing GPU falls back instead of failing."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = {"cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider"], "cpu": []}.get(device.split(":")[0], [])
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto | bytes, threads: int | None = None, device: str = "cpu",
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
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers_for(device))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented classes for bad graphs
        first = first_line(exc)
        raise ModelDirError(f"{name or 'graph'}: ONNX Runtime cannot load it ({first[:300]}); "
                            "re-export the model") from None


INT8_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul")  # this module's and ORT's quantizer's


def graph_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-adds per item of a graph's matrix products and convolutions with constant weights, by the precision
    they run in: {"int8": ..., "float": ...} (Gemm, MatMul, Conv, ConvTranspose, and the integer products of int8
    graphs). Convolutions take their spatial sizes from ONNX shape inference (batch 1), so no framework is needed
    to count the work of an exported model."""
    import onnx

    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {"int8": 0, "float": 0}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    spatial: dict[str, tuple[int, ...]] = {}
    if convs:  # the activations' shapes, batch fixed to 1
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        for value in fixed.graph.input:
            dims = value.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].dim_value = 1
        inferred = onnx.shape_inference.infer_shapes(fixed).graph
        for value in (*inferred.value_info, *inferred.input, *inferred.output):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                spatial[value.name] = tuple(d.dim_value for d in dims)
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in shapes:
            continue
        dims = shapes[node.input[1]]
        if node.op_type in ("Gemm", "MatMul", *INT8_OPS) and len(dims) == 2:
            out["int8" if node.op_type in INT8_OPS else "float"] += int(dims[0] * dims[1])
        elif node.op_type in ("Conv", "ConvTranspose") and len(dims) >= 3:
            # weights (Cout, Cin/g, k...) for Conv, (Cin, Cout/g, k...) for ConvTranspose: each weight is one
            # multiply-add per output position of a Conv, per input position of a ConvTranspose
            where = spatial.get(node.output[0] if node.op_type == "Conv" else node.input[0])
            if where is not None:
                out["float"] += int(math.prod(dims) * math.prod(where[2:]))
    return out
