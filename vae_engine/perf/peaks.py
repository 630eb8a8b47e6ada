"""This machine's own GEMM peak per precision (fp32, bf16, int8; CPU and GPU), measured with the timing recipe:
the ceiling every GFLOP/s in a report (bench, train, evaluate) is held against."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from ..core import hardware, onnxwire
from ..modeldir import graphs
from .timing import best_rate


def _onnx_gemm(n: int, a_type: int, b_type: int, op: str = "MatMul") -> bytes:
    """An n x n x n product as a one-node ONNX graph (IR version 8, opset 18's own: ONNX Runtime releases older
    than the onnx package refuse newer IRs), encoded without onnx."""
    out_type = onnxwire.TENSOR_INT32 if op == "MatMulInteger" else onnxwire.TENSOR_FLOAT
    return onnxwire.model([onnxwire.node(op, ["a", "b"], ["c"])],
                          [onnxwire.output("a", (n, n), a_type), onnxwire.output("b", (n, n), b_type)],
                          [onnxwire.output("c", (n, n), out_type)], graphs.OPSET)


def gemm_peak(threads: int, n: int = 2048, min_time: float = 0.5) -> dict[str, dict[str, float]]:
    """Best GEMM rate (GFLOP/s) of each library on an n x n x n product with `threads` threads each (NumPy's BLAS
    and torch limited to them for the measurement), per precision: {precision: {lib: rate}}.

    fp32: NumPy, PyTorch, ONNX Runtime. bf16: PyTorch (a smaller product where bf16 is emulated, which is
    slow). int8: ONNX Runtime's MatMulInteger (u8 x s8 -> s32, what its dynamic-quantized graphs run), counted
    as 2 ops per multiply-add like the rest. On a GPU: PyTorch fp32 (TF32 off) and bf16, as cuda-fp32/cuda-bf16.
    Without PyTorch (an inference install), its rates are left out: no bf16 peak, fp32 from NumPy and ONNX Runtime.
    """
    g = np.random.default_rng(0)
    a, b = g.standard_normal((n, n), np.float32), g.standard_normal((n, n), np.float32)
    sess = graphs.make_session(_onnx_gemm(n, onnxwire.TENSOR_FLOAT, onnxwire.TENSOR_FLOAT), threads)
    with threadpool_limits(threads, user_api="blas"):  # NumPy's BLAS takes every core unless told
        numpy_rate = best_rate(lambda: a @ b, 2.0 * n**3, min_time)
    peaks = {"fp32": {"numpy": numpy_rate,
                      "onnxruntime": best_rate(lambda: sess.run(None, {"a": a, "b": b}), 2.0 * n**3, min_time)}}
    torch = _torch()
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            peaks["fp32"]["torch"] = best_rate(lambda: ta @ tb, 2.0 * n**3, min_time)
            nb = n if hardware.native_bf16() else 512
            ha, hb = ta[:nb, :nb].bfloat16(), tb[:nb, :nb].bfloat16()
            peaks["bf16"] = {"torch": best_rate(lambda: ha @ hb, 2.0 * nb**3, min_time)}
        finally:
            torch.set_num_threads(torch_threads)
    qa, qb = g.integers(0, 255, (n, n), dtype=np.uint8), g.integers(-127, 127, (n, n), dtype=np.int8)
    qsess = graphs.make_session(_onnx_gemm(n, onnxwire.TENSOR_UINT8, onnxwire.TENSOR_INT8, "MatMulInteger"), threads)
    peaks["int8"] = {"onnxruntime": best_rate(lambda: qsess.run(None, {"a": qa, "b": qb}), 2.0 * n**3, min_time)}
    if torch is not None and torch.cuda.is_available():
        m = 8192
        ca = torch.randn(m, m, device="cuda")
        cb = torch.randn(m, m, device="cuda")
        torch.backends.cuda.matmul.allow_tf32 = False

        def cuda(x, y):
            return lambda: (x @ y, torch.cuda.synchronize())

        peaks["cuda-fp32"] = {"torch": best_rate(cuda(ca, cb), 2.0 * m**3, min_time)}
        peaks["cuda-bf16"] = {"torch": best_rate(cuda(ca.bfloat16(), cb.bfloat16()), 2.0 * m**3, min_time)}
        peaks["cuda-fp16"] = {"torch": best_rate(cuda(ca.half(), cb.half()), 2.0 * m**3, min_time)}
        del ca, cb
    return peaks


def _torch():
    """torch where the process already uses it (a torch path, bench), else None: the peaks of a job on exported
    graphs are NumPy's and ONNX Runtime's, and importing torch only to time it would cost the job a second."""
    import sys

    return sys.modules.get("torch")


def limit_seconds(macs: dict[str, float], peaks: dict[str, float]) -> float | None:
    """Seconds for these multiply-adds at the GEMM peak (GFLOP/s, 2 FLOP each) of each one's precision, or None
    where a precision has no measured peak here."""
    if not all(p in peaks and peaks[p] for p, m in macs.items() if m):
        return None
    return sum(2 * m / (peaks[p] * 1e9) for p, m in macs.items() if m)


_PEAKS: dict[int, dict[str, float]] = {}
PEAKS_FILE = "gemm-peaks.json"  # in the user's cache folder: one machine's peaks per thread count
PEAKS_SCHEMA = "vae-engine-peaks/1"


def measured_peaks(threads: int) -> dict[str, float]:
    """The best GEMM rate per precision at `threads` (a short `gemm_peak`), measured once per machine: kept in
    the user's cache folder, keyed by the CPU, its flags, the thread count and the libraries' versions, so a job
    that reports its fraction of the limit (evaluate, train) does not spend ~2 s measuring it each time.
    `vae-engine bench` measures its peaks fresh in its own run."""
    if threads not in _PEAKS:
        _PEAKS[threads] = _cached_peaks(threads)
    return dict(_PEAKS[threads])


def _cached_peaks(threads: int) -> dict[str, float]:
    import time

    from ..core.config import cache_dir
    from ..core.errors import VaeEngineError
    from ..modeldir.configfile import versions
    from ..modeldir.layout import put_entry, read_entries

    every = versions()
    key = {"cpu": hardware.cpu_info()[0], "flags": hardware.key_flags(), "threads": threads,
           "torch": _torch() is not None, "gpu": hardware.gpu_name() if _torch() is not None else None,
           "versions": {k: every[k] for k in ("numpy", "onnxruntime", "torch")}}
    path = cache_dir() / PEAKS_FILE
    for e in read_entries(path, PEAKS_SCHEMA, "entries"):
        peaks = e.get("peaks")
        if e.get("key") == key and isinstance(peaks, dict) and all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1e9 for v in peaks.values()):
            return {str(p): float(v) for p, v in peaks.items()}
    peaks = {p: max(v.values()) for p, v in gemm_peak(threads, min_time=0.3).items()}
    entry = {"key": key, "peaks": peaks, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        put_entry(path, PEAKS_SCHEMA, "entries", entry, keep=16)
    except (OSError, VaeEngineError):
        pass  # a read-only home: measured again next time
    return peaks
