"""ONNX Runtime over the exported graphs: fp32, int8 (`export --quantize int8`) and fp16 (`--fp16`) files, on the
CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core.config import ModelConfig
from ...modeldir import graphs
from .base import EXPORT_FLAG, BackendSpec, GraphBackend, PathSpec, unsupported

GRAPHS = {"fp32": "fp32", "int8": "int8", "fp16": "fp16"}  # precision -> the ONNX graph variant it runs


class OrtBackend(GraphBackend):
    """ONNX Runtime sessions over the exported graphs (fp32, int8 or fp16 files), created once per backend."""

    name = "onnxruntime"

    def __init__(self, model_dir: Path, cfg: ModelConfig, precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False, variant: str | None = None):
        super().__init__(cfg)
        if variant is None and precision not in GRAPHS:
            raise unsupported("onnxruntime", precision, "its CPU provider has no bf16 kernels (onnxruntime #20630); "
                               "use --backend openvino or torch")
        self.precision, self.variant = precision, variant or GRAPHS[precision]
        self.sessions, self.calls, self.outputs, self.inputs = {}, {}, {}, {}
        self.session_args = (threads, device, spin)
        for role in graphs.ROLES:
            path = self.paths[role] = self._graph(model_dir, role, self.variant)
            self.graphs[role] = graphs.load_graph(path, role, cfg)
        self.provider = "CPUExecutionProvider"  # on the CPU sessions open on first use (`_opened`)
        if device != "cpu":  # the provider a GPU session got (ORT falls back to the CPU where CUDA cannot start)
            self._opened("decoder")
            self.provider = self.sessions["decoder"].get_providers()[0]
        if self.provider != "CPUExecutionProvider":
            self.chunk_rows = None  # a GPU runs a large call best whole; its outputs are not in host memory

    def _open(self, role: str, graph: graphs.Graph) -> None:
        """A session for `role`, and how it is called. On the CPU, the session's compiled core is called directly:
        `InferenceSession.run` re-validates the feed on every call (5-8 us at batch 1 on the 2-core AVX2 EPYC)
        and exists to retry a failed GPU provider; the engine's feed is always the graph's one checked input."""
        session = self.sessions[role] = graphs.make_session(graph, *self.session_args, name=str(graph.path))
        self.inputs[role], self.outputs[role] = graph.inputs[0][0], [o.name for o in session.get_outputs()]
        core = getattr(session, "_sess", None)
        cpu = session.get_providers()[0] == "CPUExecutionProvider"
        self.calls[role] = core.run if cpu and callable(getattr(core, "run", None)) else session.run

    def _infer(self, role, a, out=None):
        if out is None:
            return self.calls[role](self.outputs[role], {self.inputs[role]: a}, None)
        binding = self.sessions[role].io_binding()  # the outputs written in place: no copy of a chunk's result
        binding.bind_cpu_input(self.inputs[role], a)
        for name, o in zip(self.outputs[role], out, strict=True):
            binding.bind_output(name, "cpu", 0, np.float32, o.shape, o.ctypes.data)
        self.sessions[role].run_with_iobinding(binding)
        return out

    def raw_call(self, op: str, a: np.ndarray):
        """One public `InferenceSession.run` of the op's graph (the fused one for reconstruct): see `RAW_CALL`."""
        role = self._raw_role(op, a)
        session, feed = self.sessions[role], {self.inputs[role]: a}
        return lambda: session.run(None, feed)[0]


def _missing(precision: str, device: str, model_dir: Path | None) -> str | None:
    if device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("onnxruntime has no CUDA provider here (replace it with the GPU build: pip uninstall "
                    "onnxruntime && pip install onnxruntime-gpu)")
    variant = GRAPHS[precision]
    if model_dir is not None and not graphs.graph_path(model_dir, "encoder", variant).is_file():
        return f"{variant} graphs not exported (vae-engine export MODEL{EXPORT_FLAG[variant]})"
    return None


SPEC = BackendSpec(
    "onnxruntime",
    (PathSpec("fp32", "cpu", "ort-fp32"), PathSpec("int8", "cpu", "ort-int8"), PathSpec("fp16", "cpu"),
     PathSpec("fp32", "cuda", "ort-cuda"), PathSpec("fp16", "cuda", "ort-cuda-fp16")),
    lambda model_dir, cfg, precision, threads, device, spin: OrtBackend(model_dir, cfg, precision, threads, device,
                                                                         spin),
    _missing,
)
