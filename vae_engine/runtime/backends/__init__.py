"""Backends behind one small interface: `encode(x) -> (mu, logvar)` and `decode(z) -> params`, NumPy float32 in
and out, at a named precision. One module per backend, each declaring its `BackendSpec` (the paths it runs, how to
open one, what a machine lacks for one); REGISTRY below lists them, and load_backend, the availability check
(`unavailable`), BACKENDS, PATHS and bench's paths read it. Everything else (sampling, ELBO/IWAE math) lives in the
engine; which path is fastest here within an accuracy budget in `tuning` (whose per-machine-class candidate policy
names the backends it measures).

Adding a backend: a module defining a Backend class and its SPEC, and its line in REGISTRY.
"""

from __future__ import annotations

from pathlib import Path

from ... import modeldir
from ...core import hardware
from ...core.errors import VaeEngineError
from ...modeldir import graphs
from . import ort, ov, pytorch
from .base import EXPORT_FLAG, PRECISIONS, RAW_CALL, Backend, BackendSpec, PathSpec, set_threads

REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in (
    *pytorch.SPECS,  # torch, torch-compile
    ort.SPEC,  # onnxruntime
    ov.SPEC,  # openvino
)}
BACKENDS = ("auto", *REGISTRY)
# every path the backends implement, as (backend, precision, device); `unavailable` says which can run here
PATHS = tuple((name, p.precision, p.device) for name, spec in REGISTRY.items() for p in spec.paths)


def openvino_installed() -> bool:
    """Is OpenVINO importable (without importing it)?"""
    return hardware.installed("openvino")


def default_backend(model_dir: Path, precision: str, device: str = "cpu") -> str:
    """The backend that runs a precision when none is named (every job, `evaluate`, the server). On a GPU torch
    (every GPU precision but int8, and it scores next to its decoder; ONNX Runtime needs its GPU build there). On
    the CPU ONNX Runtime for exported fp32/int8/fp16 graphs, torch otherwise (bf16 on torch, or OpenVINO when it
    is installed and the CPU has native bf16)."""
    if device.split(":")[0] == "cuda" and precision != "int8":
        return "torch"
    if precision == "bf16":
        return "openvino" if device == "cpu" and hardware.native_bf16() and openvino_installed() else "torch"
    if precision != "fp32":  # int8/fp16 exist only as ONNX: onnxruntime asks for their export if missing
        return "onnxruntime"
    return "onnxruntime" if graphs.graph_path(model_dir, "encoder", "fp32").is_file() else "torch"


def unavailable(backend: str, precision: str, device: str = "cpu", model_dir: str | Path | None = None) -> str | None:
    """Why a path cannot run on this machine (what is missing, and how to get it), or None when it can.

    torch bf16 on a CPU without native bf16 can run (emulated: correct, slow); the GPU paths need a CUDA GPU that
    torch sees, and ONNX Runtime's its CUDA provider; ONNX paths need their graphs exported into `model_dir`.
    """
    if (backend, precision, device) not in PATHS:
        return f"--backend {backend} does not implement --precision {precision} on --device {device}"
    if device == "cuda" and not hardware.cuda_available():
        return "no CUDA GPU here (torch sees none: a CPU build of torch, or no driver)"
    return REGISTRY[backend].missing(precision, device, None if model_dir is None else Path(model_dir))


def load_backend(model_dir: str | Path, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 device: str = "cpu", spin: bool = False) -> Backend:
    """The backend of that name at that precision (`auto`: `default_backend`)."""
    model_dir = Path(model_dir)
    cfg = modeldir.model_config(model_dir)
    if backend not in BACKENDS:
        raise VaeEngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise VaeEngineError(f"unknown precision {precision!r}: choose one of auto, {', '.join(PRECISIONS)}")
    if backend == "auto":
        backend = default_backend(model_dir, precision, device)
    if device != "cpu":  # a GPU asked for and not usable here is an error, not a quiet run on the CPU
        why = unavailable(backend, precision, device.split(":")[0], model_dir)
        if why:
            raise VaeEngineError(f"--device {device}: {why}")
    return REGISTRY[backend].open(model_dir, cfg, precision, threads, device, spin)


__all__ = ["REGISTRY", "BACKENDS", "PATHS", "PRECISIONS", "EXPORT_FLAG", "RAW_CALL", "Backend", "BackendSpec",
           "PathSpec", "default_backend", "unavailable", "load_backend", "set_threads", "openvino_installed"]
