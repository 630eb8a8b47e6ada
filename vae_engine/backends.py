"""Backends behind one small interface: `encode(x) -> (mu, logvar)` and `decode(z) -> params`, NumPy float32
in and out, at a named precision. Chosen by name in `load_backend`; everything else (sampling, ELBO/IWAE math)
lives in the engine, and which (backend, precision) is fastest here under an accuracy budget in `tuning`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from . import checkpoint, graphs, hardware
from .config import ModelConfig
from .errors import ModelDirError, VaeEngineError

BACKENDS = ("auto", "torch", "torch-compile", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # what the numbers inside the networks are; I/O is always fp32
ORT_GRAPHS = {"fp32": "fp32", "int8": "int8", "fp16": "fp16"}  # precision -> ONNX graph variant ONNX Runtime runs
EXPORT_FLAG = {"fp32": "", "optimized": " --optimize", "int8": " --quantize int8", "fp16": " --fp16"}


class Backend(Protocol):
    """What every backend provides."""

    name: str
    precision: str
    provider: str

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, D) float32 raw features -> (mu, logvar), each (B, L) float32."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z (B, L) float32 -> the likelihood's parameters (B, P*D) float32."""


def _unsupported(backend: str, precision: str, why: str) -> VaeEngineError:
    return VaeEngineError(f"--backend {backend} cannot run --precision {precision}: {why}")


class TorchBackend:
    """PyTorch eager (the reference), or torch.compile'd encoder and decoder; fp32, bf16 (CPUs with AVX512_BF16 or
    AMX and GPUs; emulated, slowly, elsewhere) or fp16 (GPU). Inputs and outputs stay float32."""

    def __init__(self, model_dir: Path, compile: bool = False, device: str = "cpu", threads: int | None = None,
                 precision: str = "fp32"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.name = "torch-compile" if compile else "torch"
        if device == "cuda" and not torch.cuda.is_available():
            raise VaeEngineError("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver)")
        self.device = torch.device(device)
        if precision not in ("fp32", "bf16", "fp16") or (precision == "fp16" and self.device.type != "cuda"):
            raise _unsupported(self.name, precision, "torch runs fp32 and bf16 (and fp16 on a GPU); int8 is "
                               "--backend onnxruntime's (export --quantize int8)")
        self.precision, self.provider = precision, self.device.type
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        model = checkpoint.load_model(model_dir).to(self.device, self.dtype)
        self.encoder, self.decoder, self.likelihood = model.encoder, model.decoder, model.likelihood
        # on a GPU the IWAE log-weights are computed where the decoder's outputs are (`log_weights`): copying
        # K x D parameters per item to the host would cost more than the network itself
        self.score_rows = 1 << 20 if self.device.type == "cuda" else None
        if compile:  # dynamic batch axis, so a new batch size does not recompile
            self.encoder = torch.compile(self.encoder, dynamic=True)
            self.decoder = torch.compile(self.decoder, dynamic=True)

    def _run(self, net, a: np.ndarray):
        import torch

        with torch.inference_mode():
            out = net(_tensor(a).to(self.device, self.dtype))
            out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return out

    def encode(self, x):
        mu, logvar = self._run(self.encoder, x)
        return mu.cpu().numpy(), logvar.cpu().numpy()

    def raw_call(self, op: str, a: np.ndarray):
        """The network alone on `a` (already a tensor on the device): see `RAW_CALL`."""
        import torch

        t = _tensor(a).to(self.device, self.dtype)
        net = {"encode": lambda: self.encoder(t)[0], "decode": lambda: self.decoder(t),
               "reconstruct": lambda: self.decoder(self.encoder(t)[0].to(self.dtype))}[op]

        def call():
            with torch.inference_mode():
                out = net()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            return out
        return call

    def decode(self, z):
        return self._run(self.decoder, z).cpu().numpy()

    def log_weights(self, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """IWAE log-weights (b, K) float64 on the backend's device: the network at its precision, the
        reparameterization and every log-density in fp32 (the twin of `kernels.log_weights`)."""
        import torch

        from .model import gaussian_log_prob, standard_normal_log_prob

        with torch.inference_mode():
            x_t, mu_t, lv_t, eps_t = (_tensor(a).to(self.device, non_blocking=True)
                                      for a in (x, mu, logvar, eps))
            z = mu_t[:, None] + torch.exp(0.5 * lv_t)[:, None] * eps_t  # (b, K, L)
            params = self.decoder(z.reshape(-1, z.shape[-1]).to(self.dtype)).float().reshape(*z.shape[:2], -1)
            log_w = (self.likelihood.log_prob(x_t[:, None], params) + standard_normal_log_prob(z)
                     - gaussian_log_prob(z, mu_t[:, None], lv_t[:, None]))
            return log_w.double().cpu().numpy()


def _tensor(a: np.ndarray):
    """A torch view of a NumPy array; read-only memory (a memory-mapped .npy, a request's bytes) is copied, since
    torch cannot mark a tensor read-only and warns instead."""
    import torch

    return torch.from_numpy(a if a.flags.writeable else a.copy())


class _GraphBackend:
    """What the ONNX-graph backends share: the specs, and checking every output before the kernels see it."""

    name = "graph"

    def __init__(self, cfg: ModelConfig):
        self.latent_dim, self.out_dim = cfg.latent_dim, graphs.spec("decoder", cfg).outputs[0][1]
        self.paths: dict[str, Path] = {}

    @staticmethod
    def _graph(model_dir: Path, role: str, variant: str) -> Path:
        path = graphs.graph_path(model_dir, role, variant)
        if not path.is_file():
            raise VaeEngineError(f"{path} not found: run `vae-engine export {model_dir}{EXPORT_FLAG[variant]}` first")
        return path

    def _infer(self, role: str, a: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for one input array (raises whatever the runtime raises)."""
        raise NotImplementedError

    def _run(self, role: str, a: np.ndarray, features: tuple[int, ...]) -> list[np.ndarray]:
        """Run one graph and check what it returns: the Numba kernels downstream trust these shapes."""
        try:
            outs = self._infer(role, a)
        except Exception as exc:  # a graph that loaded but cannot run (crafted shapes, unsupported ops)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelDirError(f"{self.paths[role]}: {self.name} failed to run it ({first[:300]})") from None
        for out, width in zip(outs, features, strict=True):
            if out.shape != (a.shape[0], width) or out.dtype != np.float32:
                raise ModelDirError(f"{self.paths[role]}: returned {out.dtype} {out.shape} where the model needs "
                                    f"float32 ({a.shape[0]}, {width}); re-export the model")
        return outs

    def encode(self, x):
        mu, logvar = self._run("encoder", x, (self.latent_dim, self.latent_dim))
        return mu, logvar

    def decode(self, z):
        return self._run("decoder", z, (self.out_dim,))[0]


class OrtBackend(_GraphBackend):
    """ONNX Runtime sessions over the exported graphs (fp32, int8 or fp16 files), created once per backend."""

    name = "onnxruntime"

    def __init__(self, model_dir: Path, cfg: ModelConfig, precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False, variant: str | None = None):
        super().__init__(cfg)
        if variant is None and precision not in ORT_GRAPHS:
            raise _unsupported("onnxruntime", precision, "its CPU provider has no bf16 kernels (onnxruntime #20630); "
                               "use --backend openvino or torch")
        self.precision, self.variant = precision, variant or ORT_GRAPHS[precision]
        self.sessions, self.inputs, self.models = {}, {"encoder": "x", "decoder": "z", "reconstruct": "x"}, {}
        self.session_args = (threads, device, spin)
        for role in graphs.ROLES:
            path = self.paths[role] = self._graph(model_dir, role, self.variant)
            self.models[role] = graphs.load_graph(path, role, cfg)
            self.sessions[role] = graphs.make_session(self.models[role], *self.session_args, name=str(path))
        self.provider = self.sessions["decoder"].get_providers()[0]

    def _infer(self, role, a):
        return self.sessions[role].run(None, {self.inputs[role]: a})

    def raw_call(self, op: str, a: np.ndarray):
        """One `InferenceSession.run` of the op's graph (the fused one for reconstruct): see `RAW_CALL`."""
        if op == "reconstruct":
            self.reconstruct_params(a)  # builds the fused session
        role = {"encode": "encoder", "decode": "decoder", "reconstruct": "reconstruct"}[op]
        session, feed = self.sessions[role], {self.inputs[role]: a}
        return lambda: session.run(None, feed)[0]

    def reconstruct_params(self, x: np.ndarray) -> np.ndarray:
        """Decoder parameters at the posterior mean, x (B, D) -> (B, P*D), in one ONNX Runtime call: the two
        checked graphs merged (encoder's mu feeding the decoder's z), built on first use. One call instead of two
        halves the per-call overhead that dominates batch-1 latency."""
        if "reconstruct" not in self.sessions:
            import onnx
            from onnx import compose

            enc, dec = onnx.ModelProto(), compose.add_prefix(self.models["decoder"], "decoder/")
            enc.CopyFrom(self.models["encoder"])
            for m in (enc, dec):
                del m.metadata_props[:]  # the graphs' own metadata differ (role); the fused one needs none
            fused = compose.merge_models(enc, dec, io_map=[("mu", "decoder/z")], outputs=[dec.graph.output[0].name])
            self.paths["reconstruct"] = self.paths["decoder"]
            self.sessions["reconstruct"] = graphs.make_session(fused, *self.session_args, name="encoder+decoder")
        return self._run("reconstruct", x, (self.out_dim,))[0]


class OpenVinoBackend(_GraphBackend):
    """OpenVINO over the same fp32 ONNX graphs (checked, then handed over as bytes, so no external data can come
    in): one compiled model and one infer request per graph, latency hint, one stream, explicit threads; bf16 by
    the inference-precision hint, only where the CPU has native bf16 (elsewhere OpenVINO silently runs fp32)."""

    name = "openvino"

    def __init__(self, model_dir: Path, cfg: ModelConfig, precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu"):
        super().__init__(cfg)
        try:
            import openvino as ov
        except ImportError:
            raise VaeEngineError("--backend openvino needs OpenVINO: pip install 'vae-engine[openvino]'") from None
        if precision not in ("fp32", "bf16"):
            raise _unsupported("openvino", precision, "it runs the fp32 graphs in fp32 or bf16; int8 is "
                               "--backend onnxruntime's")
        if precision == "bf16" and not hardware.native_bf16():
            raise _unsupported("openvino", precision, "this CPU has no native bf16 (AVX512_BF16 or AMX), where "
                               "OpenVINO would quietly run fp32; use --precision fp32")
        if device != "cpu":
            raise VaeEngineError("--backend openvino runs on the CPU here; use torch or onnxruntime for a GPU")
        self.precision, self.provider, self.ov = precision, "CPU", ov
        core = ov.Core()
        props = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                 "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        self.requests = {}
        for role in graphs.ROLES:
            path = self.paths[role] = self._graph(model_dir, role, "fp32")
            raw = graphs.load_graph(path, role, cfg).SerializeToString()
            try:
                compiled = core.compile_model(core.read_model(raw, ov.Tensor(np.empty(0, np.uint8))), "CPU", props)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelDirError(f"{path}: OpenVINO cannot load it ({first[:300]}); re-export the model") from None
            self.requests[role] = compiled.create_infer_request(), len(compiled.outputs)

    def _infer(self, role, a):
        req, outputs = self.requests[role]
        # zero-copy in; OpenVINO shares only writable buffers, so a read-only one (a memory-mapped .npy, bytes
        # from a request) is the one case copied
        req.set_input_tensor(self.ov.Tensor(a, shared_memory=a.flags.writeable))
        req.infer()
        # the request reuses its output buffers on the next call: hand out copies. get_output_tensor(i), not the
        # output_tensors property, which costs ~30 us a call (measured, OpenVINO 2026.4): a third of a batch-1 call
        return [np.array(req.get_output_tensor(i).data, copy=True) for i in range(outputs)]

    def raw_call(self, op: str, a: np.ndarray):
        """The infer request(s) alone, outputs left in OpenVINO's buffers (mu handed to the decoder in place for
        reconstruct): see `RAW_CALL`."""
        def run(role: str, arr: np.ndarray) -> np.ndarray:
            req = self.requests[role][0]
            req.set_input_tensor(self.ov.Tensor(arr, shared_memory=True))
            req.infer()
            return req.get_output_tensor(0).data

        a = np.array(a)  # writable, so shared
        return {"encode": lambda: run("encoder", a), "decode": lambda: run("decoder", a),
                "reconstruct": lambda: run("decoder", run("encoder", a))}[op]


RAW_CALL = """Every backend's `raw_call(op, a)` returns a zero-argument callable that runs the runtime alone on the
prepared input `a` for op "encode", "decode" or "reconstruct" and returns the runtime's first output in the
runtime's own type (mu; the decoder's parameters): no input rule, no output checks, conversions or copies.
`vae-engine bench` times it beside the engine's own call to report the engine's per-call overhead."""


def set_threads(threads: int | None) -> int:
    """Set torch and Numba thread counts (ORT takes its own per session); return the count used."""
    import numba

    from .config import MAX_THREADS, check_int

    threads = hardware.available_cpus() if threads is None else check_int("threads", threads, 1, MAX_THREADS)
    if "torch" in sys.modules:  # torch backends set it too; a pure ONNX Runtime job never imports torch
        sys.modules["torch"].set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def default_backend(model_dir: Path, precision: str, device: str = "cpu") -> str:
    """The backend that runs a precision when none is named: ONNX Runtime for exported fp32/int8/fp16 graphs,
    torch otherwise (bf16 on torch, or OpenVINO when it is installed and the CPU has native bf16)."""
    if precision == "bf16":
        return "openvino" if device == "cpu" and hardware.native_bf16() and openvino_installed() else "torch"
    if precision != "fp32":  # int8/fp16 exist only as ONNX: onnxruntime asks for their export if missing
        return "onnxruntime"
    return "onnxruntime" if graphs.graph_path(model_dir, "encoder", "fp32").is_file() else "torch"


# Every path the backends implement, as (backend, precision, device); `unavailable` says which can run here.
PATHS = (
    ("torch", "fp32", "cpu"), ("torch", "bf16", "cpu"), ("torch-compile", "fp32", "cpu"),
    ("onnxruntime", "fp32", "cpu"), ("onnxruntime", "int8", "cpu"), ("onnxruntime", "fp16", "cpu"),
    ("openvino", "fp32", "cpu"), ("openvino", "bf16", "cpu"),
    ("torch", "fp32", "cuda"), ("torch", "bf16", "cuda"), ("torch", "fp16", "cuda"),
    ("onnxruntime", "fp32", "cuda"), ("onnxruntime", "fp16", "cuda"),
)


def unavailable(backend: str, precision: str, device: str = "cpu", model_dir: str | Path | None = None) -> str | None:
    """Why a path cannot run on this machine (what is missing, and how to get it), or None when it can.

    torch bf16 on a CPU without native bf16 can run (emulated: correct, slow); the GPU paths need a CUDA GPU that
    torch sees, and ONNX Runtime's its CUDA provider; ONNX paths need their graphs exported into `model_dir`.
    """
    if (backend, precision, device) not in PATHS:
        return f"--backend {backend} does not implement --precision {precision} on --device {device}"
    if device == "cuda" and not hardware.cuda_available():
        return "no CUDA GPU here (torch sees none: a CPU build of torch, or no driver)"
    if backend == "onnxruntime":
        if device == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "onnxruntime has no CUDA provider here (pip install 'vae-engine[gpu]')"
        variant = ORT_GRAPHS[precision]
        if model_dir is not None and not graphs.graph_path(model_dir, "encoder", variant).is_file():
            return f"{variant} graphs not exported (vae-engine export MODEL{EXPORT_FLAG[variant]})"
    if backend == "openvino":
        if not openvino_installed():
            return "OpenVINO is not installed (pip install 'vae-engine[openvino]')"
        if model_dir is not None and not graphs.graph_path(model_dir, "encoder", "fp32").is_file():
            return "fp32 graphs not exported (vae-engine export MODEL)"
        if precision == "bf16" and not hardware.native_bf16():
            return "this CPU has no native bf16 (AVX512_BF16 or AMX), where OpenVINO would quietly run fp32"
    if backend == "torch-compile":
        import shutil

        if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++")):
            return "torch.compile needs a C/C++ compiler on PATH (apt-get install gcc g++)"
    return None


def openvino_installed() -> bool:
    """Is OpenVINO importable (without importing it)?"""
    import importlib.util

    return "openvino" in sys.modules or importlib.util.find_spec("openvino") is not None


def load_backend(model_dir: str | Path, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False) -> Backend:
    """The backend of that name at that precision (`auto`: `default_backend`)."""
    model_dir = Path(model_dir)
    cfg = checkpoint.model_config(model_dir)
    if backend not in BACKENDS:
        raise VaeEngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise VaeEngineError(f"unknown precision {precision!r}: choose one of auto, {', '.join(PRECISIONS)}")
    if backend == "auto":
        backend = default_backend(model_dir, precision, device)
    if backend == "onnxruntime":
        return OrtBackend(model_dir, cfg, precision, threads, device, spin)
    if backend == "openvino":
        return OpenVinoBackend(model_dir, cfg, precision, threads, device)
    return TorchBackend(model_dir, compile=backend == "torch-compile", device=device, threads=threads,
                        precision=precision)
