"""The ONNX graphs of a model directory: names, specs, variants, and safe loading.

One source of truth for what `export` writes and what the engine and `info` read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .config import INPUT_DIM, ModelConfig
from .errors import ModelDirError

ROLES = ("encoder", "decoder")
VARIANTS = {  # variant -> file suffix
    "fp32": ".onnx",  # the portable graph, validated against PyTorch
    "optimized": ".opt.onnx",  # ORT-optimized (may hold ORT-only fused ops), CPU provider
    "int8": ".int8.onnx",  # dynamically quantized weights (onnxruntime.quantization)
    "fp16": ".fp16.onnx",  # half-precision weights and compute, fp32 inputs/outputs; for GPU providers
}
OPSET = 18


@dataclass(frozen=True)
class GraphSpec:
    """Input and output names of one graph, each (batch, features)."""

    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]


def spec(role: str, cfg: ModelConfig) -> GraphSpec:
    """The declared spec of the encoder (x -> mu, logvar) or decoder (z -> logits) graph."""
    if role == "encoder":
        return GraphSpec((("x", INPUT_DIM),), (("mu", cfg.latent_dim), ("logvar", cfg.latent_dim)))
    return GraphSpec((("z", cfg.latent_dim),), (("logits", INPUT_DIM),))


def graph_path(model_dir: str | os.PathLike, role: str, variant: str = "fp32") -> Path:
    """Where a graph variant lives in a model directory, e.g. decoder.int8.onnx."""
    return Path(model_dir) / f"{role}{VARIANTS[variant]}"


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _uses_external_data(model: onnx.ModelProto) -> bool:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    return any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors)


def load_graph(path: str | os.PathLike, role: str, cfg: ModelConfig) -> onnx.ModelProto:
    """Parse an ONNX file safely and check it against the model config.

    Refuses external data (a data location outside the model folder is a known path-traversal class,
    CVE-2022-25882 and CVE-2024-27318) and any input/output whose name or shape differs from the spec.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; run `vae-engine export {path.parent}` first")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file ({type(exc).__name__})") from None
    if not model.graph.node:
        raise ModelDirError(f"{path}: corrupt or truncated ONNX file (empty graph)")
    if _uses_external_data(model):
        raise ModelDirError(f"{path}: refers to external data files; refusing to load it (self-contained graphs only)")
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


def providers_for(device: str) -> list[str]:
    """Execution providers for a device, always ending in CPU so a missing GPU falls back instead of failing."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = {"cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider"], "cpu": []}.get(device, [])
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto | bytes, threads: int | None = None, device: str = "cpu",
                 spin: bool = False, optimized_path: str | None = None):
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
    return ort.InferenceSession(data, sess_options=opts, providers=providers_for(device))
