"""Backends behind one small interface: `encode(x) -> (mu, logvar)` and `decode(z) -> logits`, NumPy float32
in and out. Chosen by name in `load_backend`; everything else (sampling, ELBO/IWAE math) lives in the engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import checkpoint, graphs
from .config import ModelConfig
from .errors import VaeEngineError

BACKENDS = ("auto", "torch", "torch-compile", "onnxruntime")


class Backend(Protocol):
    """What every backend provides."""

    name: str
    variant: str
    provider: str

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, 784) float32 in [0, 1] -> (mu, logvar), each (B, D) float32."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z (B, D) float32 -> Bernoulli logits (B, 784) float32."""


class TorchBackend:
    """PyTorch eager (the reference), or torch.compile'd encoder and decoder."""

    def __init__(self, model_dir: Path, compile: bool = False, device: str = "cpu"):
        self.name, self.variant = ("torch-compile" if compile else "torch"), "fp32"
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.provider = self.device.type
        model = checkpoint.load_model(model_dir).to(self.device)
        self.encoder, self.decoder = model.encoder, model.decoder
        if compile:  # dynamic batch axis, so a new batch size does not recompile
            self.encoder = torch.compile(self.encoder, dynamic=True)
            self.decoder = torch.compile(self.decoder, dynamic=True)

    def _run(self, net, a: np.ndarray):
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
        self.sessions = {}
        for role in graphs.ROLES:
            path = graphs.graph_path(model_dir, role, variant)
            if not path.is_file():
                flag = {"fp32": "", "optimized": " --optimize", "int8": " --quantize int8", "fp16": " --fp16"}[variant]
                raise VaeEngineError(f"{path} not found: run `vae-engine export {model_dir}{flag}` first")
            self.sessions[role] = graphs.make_session(graphs.load_graph(path, role, cfg), threads, device, spin)
        self.provider = self.sessions["decoder"].get_providers()[0]

    def encode(self, x):
        mu, logvar = self.sessions["encoder"].run(None, {"x": x})
        return mu, logvar

    def decode(self, z):
        return self.sessions["decoder"].run(None, {"z": z})[0]


def set_threads(threads: int | None) -> int:
    """Set torch and Numba thread counts (ORT takes its own per session); return the count used."""
    import numba

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threads


def load_backend(model_dir: str | Path, backend: str = "auto", variant: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False) -> Backend:
    """The backend of that name. `auto`: ONNX Runtime when the model is exported (fastest here), else torch."""
    model_dir = Path(model_dir)
    cfg = checkpoint.model_config(model_dir)
    if backend not in BACKENDS:
        raise VaeEngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "onnxruntime" if graphs.graph_path(model_dir, "encoder", variant).is_file() else "torch"
    if backend == "onnxruntime":
        return OrtBackend(model_dir, cfg, variant, threads, device, spin)
    if variant != "fp32":
        raise VaeEngineError(f"graph variant {variant!r} needs --backend onnxruntime")
    return TorchBackend(model_dir, compile=backend == "torch-compile", device=device)
