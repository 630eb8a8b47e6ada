"""OpenVINO over the fp32 ONNX graphs, in fp32 or (on CPUs with native bf16) bf16, on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core import hardware
from ...core.config import ModelConfig
from ...core.errors import ModelDirError, VaeEngineError, first_line
from ...modeldir import graphs
from .base import BackendSpec, GraphBackend, PathSpec, unsupported


class OpenVinoBackend(GraphBackend):
    """OpenVINO over the same fp32 ONNX graphs (checked, then handed over as bytes, so no external data can come
    in): one compiled model and one infer request per graph, latency hint, one stream, explicit threads; bf16 by
    the inference-precision hint, only where the CPU has native bf16 (elsewhere OpenVINO silently runs fp32)."""

    name = "openvino"

    def __init__(self, model_dir: Path, cfg: ModelConfig, precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu"):
        super().__init__(cfg)
        try:
            from .ovlib import ov  # the runtime without its model-conversion tools (40-50 ms less)
        except ImportError:
            raise VaeEngineError("--backend openvino needs OpenVINO: pip install 'vae-engine[openvino]'") from None
        if precision not in ("fp32", "bf16"):
            raise unsupported("openvino", precision, "it runs the fp32 graphs in fp32 or bf16; int8 is "
                               "--backend onnxruntime's")
        if precision == "bf16" and not hardware.native_bf16():
            raise unsupported("openvino", precision, "this CPU has no native bf16 (AVX512_BF16 or AMX), where "
                               "OpenVINO would quietly run fp32; use --precision fp32")
        if device != "cpu":
            raise VaeEngineError("--backend openvino runs on the CPU here; use torch or onnxruntime for a GPU")
        self.precision, self.provider, self.ov, self.core = precision, "CPU", ov, ov.Core()
        self.props = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                      "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        if threads:
            self.props["INFERENCE_NUM_THREADS"] = threads
        self.requests = {}
        for role in graphs.ROLES:
            path = self.paths[role] = self._graph(model_dir, role, "fp32")
            self.graphs[role] = graphs.load_graph(path, role, cfg)  # compiled on first use (`_opened`)

    def _open(self, role: str, graph: graphs.Graph) -> None:
        """One compiled model and infer request for `role`, from the checked graph's bytes."""
        ov = self.ov
        try:
            compiled = self.core.compile_model(
                self.core.read_model(graph.data, ov.Tensor(np.empty(0, np.uint8))), "CPU", self.props)
        except Exception as exc:
            first = first_line(exc)
            raise ModelDirError(f"{graph.path}: OpenVINO cannot load it ({first[:300]}); re-export the model") from None
        self.requests[role] = compiled.create_infer_request(), len(compiled.outputs)

    def _infer(self, role, a, out=None):
        req, outputs = self.requests[role]
        # zero-copy in; OpenVINO shares only writable buffers, so a read-only one (a memory-mapped .npy, bytes
        # from a request) is the one case copied
        req.set_input_tensor(self.ov.Tensor(a, shared_memory=a.flags.writeable))
        req.infer()
        # the request reuses its output buffers on the next call: hand out copies (into `out` when given).
        # get_output_tensor(i), not the output_tensors property, which costs ~30 us a call (measured, OpenVINO
        # 2026.4): a third of a batch-1 call
        if out is None:
            return [np.array(req.get_output_tensor(i).data, copy=True) for i in range(outputs)]
        for i, o in enumerate(out):
            data = req.get_output_tensor(i).data
            if data.shape != o.shape:  # never broadcast a wrong shape into the output
                raise ValueError(f"output {i} has shape {data.shape}, expected {o.shape}")
            o[...] = data
        return out

    def raw_call(self, op: str, a: np.ndarray):
        """The op's infer request alone (the fused graph's for reconstruct), its output left in OpenVINO's buffer:
        see `RAW_CALL`."""
        req = self.requests[self._raw_role(op, a)][0]
        tensor = self.ov.Tensor(np.array(a), shared_memory=True)  # a writable copy, so shared

        def run() -> np.ndarray:
            req.set_input_tensor(tensor)
            req.infer()
            return req.get_output_tensor(0).data
        return run




def _missing(precision: str, device: str, model_dir: Path | None) -> str | None:
    if not hardware.installed("openvino"):
        return "OpenVINO is not installed (pip install 'vae-engine[openvino]')"
    if model_dir is not None and not graphs.graph_path(model_dir, "encoder", "fp32").is_file():
        return "fp32 graphs not exported (vae-engine export MODEL)"
    if precision == "bf16" and not hardware.native_bf16():
        return "this CPU has no native bf16 (AVX512_BF16 or AMX), where OpenVINO would quietly run fp32"
    return None


SPEC = BackendSpec(
    "openvino", (PathSpec("fp32", "cpu", "ov-fp32"), PathSpec("bf16", "cpu", "ov-bf16")),
    lambda model_dir, cfg, precision, threads, device, spin: OpenVinoBackend(model_dir, cfg, precision, threads,
                                                                              device),
    _missing,
)
