"""Backends behind one small interface: `encode(x) -> (mu, logvar)` and `decode(z) -> logits`, NumPy float32
in and out. Chosen by name in `load_backend`; everything else (sampling, ELBO/IWAE math) lives in the engine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from . import checkpoint, graphs
from .config import ModelConfig
from .errors import ModelDirError, VaeEngineError

BACKENDS = ("auto", "torch", "torch-compile", "onnxruntime")


class Backend(Protocol):
    """What every backend provides."""

    name: str
    variant: str
    provider: str

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, D) float32 raw features -> (mu, logvar), each (B, L) float32."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z (B, L) float32 -> the likelihood's parameters (B, P*D) float32."""


class TorchBackend:
    """PyTorch eager (the reference), or torch.compile'd encoder and decoder."""

    def __init__(self, model_dir: Path, compile: bool = False, device: str = "cpu", threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.name, self.variant = ("torch-compile" if compile else "torch"), "fp32"
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.provider = self.device.type
        model = checkpoint.load_model(model_dir).to(self.device)
        self.encoder, self.decoder = model.encoder, model.decoder
        if compile:  # dynamic batch axis, so a new batch size does not recompile
            self.encoder = torch.compile(self.encoder, dynamic=True)
            self.decoder = torch.compile(self.decoder, dynamic=True)

    def _run(self, net, a: np.ndarray):
        import torch

        with torch.inference_mode():
            out = net(torch.from_numpy(a).to(self.device))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        return out

    def encode(self, x):
        mu, logvar = self._run(self.encoder, x)
        return mu.cpu().numpy(), logvar.cpu().numpy()

    def decode(self, z):
        return self._run(self.decoder, z).cpu().numpy()


class OrtBackend:
    """ONNX Runtime sessions over the exported graphs, created once per backend."""

    def __init__(self, model_dir: Path, cfg: ModelConfig, variant: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False):
        if variant not in graphs.VARIANTS:
            raise VaeEngineError(f"unknown graph variant {variant!r}: choose one of {', '.join(graphs.VARIANTS)}")
        self.name, self.variant = "onnxruntime", variant
        self.sessions, self.paths = {}, {}
        self.latent_dim, self.out_dim = cfg.latent_dim, graphs.spec("decoder", cfg).outputs[0][1]
        for role in graphs.ROLES:
            path = graphs.graph_path(model_dir, role, variant)
            if not path.is_file():
                flag = {"fp32": "", "optimized": " --optimize", "int8": " --quantize int8", "fp16": " --fp16"}[variant]
                raise VaeEngineError(f"{path} not found: run `vae-engine export {model_dir}{flag}` first")
            self.sessions[role] = graphs.make_session(graphs.load_graph(path, role, cfg), threads, device, spin,
                                                      name=str(path))
            self.paths[role] = path
        self.provider = self.sessions["decoder"].get_providers()[0]

    def _run(self, role: str, feed: dict[str, np.ndarray], features: tuple[int, ...]) -> list[np.ndarray]:
        """Run one graph and check what it returns: the Numba kernels downstream trust these shapes."""
        try:
            outs = self.sessions[role].run(None, feed)
        except Exception as exc:  # a graph that loaded but cannot run (crafted shapes, unsupported ops)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelDirError(f"{self.paths[role]}: ONNX Runtime failed to run it ({first[:300]})") from None
        batch = next(iter(feed.values())).shape[0]
        for out, width in zip(outs, features, strict=True):
            if out.shape != (batch, width) or out.dtype != np.float32:
                raise ModelDirError(f"{self.paths[role]}: returned {out.dtype} {out.shape} where the model needs "
                                    f"float32 ({batch}, {width}); re-export the model")
        return outs

    def encode(self, x):
        mu, logvar = self._run("encoder", {"x": x}, (self.latent_dim, self.latent_dim))
        return mu, logvar

    def decode(self, z):
        return self._run("decoder", {"z": z}, (self.out_dim,))[0]


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (containers).

    os.cpu_count() counts the machine's CPUs; a process pinned to fewer, or a container with a quota, that
    starts one OpenMP worker per machine CPU oversubscribes its share and slows down many times over.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "200000 100000" (quota and period, in microseconds)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def set_threads(threads: int | None) -> int:
    """Set torch and Numba thread counts (ORT takes its own per session); return the count used."""
    import numba

    from .config import MAX_THREADS, check_int

    threads = available_cpus() if threads is None else check_int("threads", threads, 1, MAX_THREADS)
    if "torch" in sys.modules:  # torch backends set it too; a pure ONNX Runtime job never imports torch
        sys.modules["torch"].set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def load_backend(model_dir: str | Path, backend: str = "auto", variant: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False) -> Backend:
    """The backend of that name. `auto`: ONNX Runtime when the model is exported (fastest here), else torch."""
    model_dir = Path(model_dir)
    cfg = checkpoint.model_config(model_dir)
    if backend not in BACKENDS:
        raise VaeEngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":  # a graph variant other than fp32 exists only as ONNX: ask for its export if missing
        exported = graphs.graph_path(model_dir, "encoder", variant).is_file()
        backend = "onnxruntime" if exported or variant != "fp32" else "torch"
    if backend == "onnxruntime":
        return OrtBackend(model_dir, cfg, variant, threads, device, spin)
    if variant != "fp32":
        raise VaeEngineError(f"graph variant {variant!r} needs --backend onnxruntime")
    return TorchBackend(model_dir, compile=backend == "torch-compile", device=device, threads=threads)
