"""What this machine can do: CPU name and instruction-set flags, native bf16 and int8 dot products, CPUs this
process may use, a CUDA GPU. One place, read by the backends, the precision tuner and the benchmark."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VaeEngineError

# instruction sets that decide which precision is fast here (Linux /proc/cpuinfo names)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products (Zen 4+, Cooper Lake, Sapphire Rapids+)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # native int8 dot products (u8 x s8 -> s32)
KEY_FLAGS = ("avx2", "fma", "avx512f", *BF16_FLAGS, *VNNI_FLAGS, "avx512_fp16")


@dataclass(frozen=True)
class Machine:
    """The hardware facts every decision reads: CPU name, its instruction-set flags, the CUDA GPU (or None)."""

    cpu: str
    flags: frozenset[str]
    gpu: str | None = None
    gpu_bf16: bool = True  # does that GPU multiply bf16 natively (Ampere and later)?


_pretended: Machine | None = None  # set by `pretend`: decisions for machine classes this one is not


@contextlib.contextmanager
def pretend(machine: Machine) -> Iterator[Machine]:
    """Within the block, every hardware fact (`cpu_info`, `native_bf16`, `has_vnni`, `cuda_available`,
    `gpu_name`) is `machine`'s: how tests check `--precision auto` for CPU classes and GPUs this machine lacks.
    What actually runs still runs on this machine (torch sees no GPU that is only pretended)."""
    global _pretended
    before, _pretended = _pretended, machine
    try:
        yield machine
    finally:
        _pretended = before


def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; the platform's name and no flags elsewhere."""
    if _pretended is not None:
        return _pretended.cpu, _pretended.flags
    return _real_cpu_info()


@functools.cache
def _real_cpu_info() -> tuple[str, frozenset[str]]:
    name, flags = platform.processor() or platform.machine() or "unknown", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("unknown", platform.processor(), platform.machine()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


def native_bf16() -> bool:
    """Does this CPU multiply bf16 natively? Without it bf16 is emulated (slower than fp32) or silently fp32."""
    return any(f in cpu_info()[1] for f in BF16_FLAGS)


def has_vnni() -> bool:
    """Does this CPU have int8 dot-product instructions (VNNI/AMX)? Without them int8 GEMMs saturate or crawl."""
    return any(f in cpu_info()[1] for f in VNNI_FLAGS)


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


def cuda_available() -> bool:
    """A CUDA GPU that torch can use (imports torch only when something already did, or when asked for it)."""
    if _pretended is not None:
        return _pretended.gpu is not None
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def gpu_bf16() -> bool:
    """Does the CUDA GPU multiply bf16 natively (compute capability 8.0+: A100, H100, L4, RTX 30xx and later)?"""
    if _pretended is not None:
        return _pretended.gpu is not None and _pretended.gpu_bf16
    return cuda_available() and bool(sys.modules["torch"].cuda.is_bf16_supported())


def resolve_device(device: str) -> str:
    """The torch device a `--device` option names, as a string: "cpu", "cuda" or "cuda:N" as given, "auto" the
    first CUDA GPU where torch sees one (else the CPU). A GPU that is not there is a clear error, not a traceback
    from deep inside torch."""
    name = device.strip().lower() if isinstance(device, str) else device
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        return "cpu"
    kind, colon, index = name.partition(":") if isinstance(name, str) else ("", "", "")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise VaeEngineError(f"unknown device {device!r}: choose cpu, cuda, cuda:N or auto")
    if not cuda_available():
        raise VaeEngineError(f"--device {device}: torch sees no CUDA GPU here (a CPU build of torch, or no "
                             "driver); use --device cpu")
    if index and _pretended is None and int(index) >= sys.modules["torch"].cuda.device_count():
        raise VaeEngineError(f"--device {device}: torch sees {sys.modules['torch'].cuda.device_count()} CUDA "
                             "GPU(s) here; choose one of them")
    return name


def gpu_name() -> str | None:
    """The first CUDA GPU's name, or None."""
    if _pretended is not None:
        return _pretended.gpu
    return sys.modules["torch"].cuda.get_device_name(0) if cuda_available() else None


def key_flags() -> list[str]:
    """The instruction-set flags that decide which path is fast here (`KEY_FLAGS` this CPU has), sorted."""
    return sorted(f for f in KEY_FLAGS if f in cpu_info()[1])


def describe(threads: int) -> dict[str, Any]:
    """The machine as reports record it: CPU, its decisive flags, cores, threads used, GPU (asks torch)."""
    name, _ = cpu_info()
    info = {"cpu": name, "flags": key_flags(), "cores": os.cpu_count(),
            "available_cpus": available_cpus(), "threads": threads, "platform": platform.platform()}
    gpu = gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def installed(module: str) -> bool:
    """Is a Python package importable here (checked without importing it)?"""
    import importlib.util
    import sys

    return module in sys.modules or importlib.util.find_spec(module) is not None
