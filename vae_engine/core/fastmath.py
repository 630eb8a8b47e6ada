"""Numba building blocks the kernels share: serial/parallel compilation (`jit`), and float32 exp and softplus
written with +, *, / only, so loops over them vectorize (LLVM here has no vector math library: math.exp and
math.log1p in a loop stay scalar libm calls).

Numba itself is loaded on first use, not on import: `numba` here is a lazily loaded module, kernels are `Kernel`s
that compile (or load from the on-disk cache) on their first call, and the helpers kernels call (`inline`) are
registered with Numba when it loads. A job that runs no kernel (an encode or a decode on ONNX Runtime) does not
pay Numba's import and the set-up of its compiler (~0.3 s on the 2-core machines: the first kernel of a process
imports numba.np.arraymath; SciPy's linear algebra, which it would import too, is skipped in `_load`)."""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from .lazy import without

PARALLEL_MIN = 1 << 20  # elements; a parallel launch costs 0.1-8 ms on 2 busy cores, so only big work pays
# values a step runs with its NumPy twin instead of loading Numba for it: ~0.1 us a value against Numba's set-up
# of ~0.5 s on the 2-core machines, so a job whose only kernels are a few draws (sample, encode --sample) never
# loads Numba
NUMPY_MAX = 1 << 20


def _lazy(name: str) -> types.ModuleType:
    """The module `name`, executed on its first attribute access (`importlib.util.LazyLoader`); the module itself
    when something imported it already."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


numba = _lazy("numba")  # kernels' bodies use numba.prange: by the time one compiles, Numba is loaded
_INLINE: list[Callable] = []  # helpers to register with Numba when it loads
_pending_threads: int | None = None  # a thread count asked for before Numba loaded
_LOCK = threading.RLock()
_loaded = False


def loaded() -> bool:
    """Has this process loaded Numba's compiler (run a kernel)?"""
    return _loaded


def _load() -> None:
    """Load Numba: register the `inline` helpers and apply a thread count asked for before."""
    global _loaded
    with _LOCK:
        if _loaded:
            return
        # numba.np.arraymath probes for BLAS on import by importing scipy.linalg.cython_blas (~0.1 s of SciPy, a
        # fifth of Numba's set-up) only to choose how np.cov/np.corrcoef compute inner products inside jitted
        # code, which no kernel here calls; Numba's np.dot and np.linalg probe again when they compile
        with without("scipy.linalg"):
            import numba.np.arraymath  # noqa: F401  (here, where its BLAS probe is answered)
            from numba.extending import register_jitable

        for fn in _INLINE:
            register_jitable(inline="always")(fn)
        _loaded = True
        if _pending_threads is not None:
            set_threads(_pending_threads)


def inline(fn: Callable) -> Callable:
    """Declare a helper that kernels call: inlined into them (and compiled with their flags) once Numba loads;
    until then, and from Python, the plain function."""
    with _LOCK:
        if _loaded:
            from numba.extending import register_jitable

            return register_jitable(inline="always")(fn)
        _INLINE.append(fn)
    return fn


def set_threads(threads: int) -> None:
    """Numba's thread count: set now where Numba is loaded, else when it loads (not loading it for this)."""
    global _pending_threads
    if not _loaded:
        _pending_threads = threads
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


class Kernel:
    """A Numba kernel compiled (or loaded from Numba's on-disk cache) on its first call, with these options;
    afterwards the dispatcher itself is called (one attribute look-up per call)."""

    def __init__(self, fn: Callable, **options: Any):
        self.fn, self.options, self.dispatcher = fn, options, None
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__

    def compile(self):
        """The dispatcher (made once)."""
        if self.dispatcher is None:
            _load()
            with _LOCK:
                if self.dispatcher is None:
                    self.dispatcher = numba.njit(**self.options)(self.fn)
        return self.dispatcher

    def __call__(self, *args):
        return (self.dispatcher or self.compile())(*args)


def njit(**options: Any) -> Callable[[Callable], Kernel]:
    """`numba.njit(**options)` made lazy (`Kernel`)."""
    return lambda fn: Kernel(fn, **options)


def jit(kernel, parallel: bool, fastmath: bool = False) -> Kernel:
    """Compile a serial or parallel variant of a kernel (on its first call). Each variant gets its own qualified
    name, because Numba's on-disk cache keys on it: two variants of one name would load each other's machine code.
    Kernels release the GIL (nogil), so threads can run them side by side (the trainer's feed on a GPU)."""
    kernel.__qualname__ = f"{kernel.__qualname__.split('.')[0]}_{'parallel' if parallel else 'serial'}"
    return Kernel(kernel, parallel=parallel, fastmath=fastmath, cache=True, nogil=True)


F32 = np.float32
HALF, ONE, TWO, ZERO = F32(0.5), F32(1.0), F32(2.0), F32(0.0)
_EXP_MIN = F32(-17.0)  # log1p(exp(a)) < 4.2e-8 below this: far under float32 resolution of a ~100-nat sum
_INV32 = F32(1.0 / 32.0)
# polynomial coefficients, highest power first (the order _horner consumes them)
_EXP_C = tuple(F32(1.0 / math.factorial(i)) for i in reversed(range(8)))  # Taylor series of exp on [-0.54, 0]
_ATANH_C = tuple(F32(2.0 / (2 * i + 1)) for i in reversed(range(7)))  # 2 atanh(s) = sum 2 s^(2i+1) / (2i+1)


@inline
def _horner(coeffs, x):
    """sum_i coeffs[i] x^(n-1-i); a constant-length tuple, so LLVM unrolls it into straight-line float32 code."""
    acc = coeffs[0]
    for i in range(1, len(coeffs)):
        acc = acc * x + coeffs[i]
    return acc


_EXPM1_C = tuple(F32(1.0 / math.factorial(i)) for i in reversed(range(1, 9)))  # (exp(t) - 1) / t, Taylor


@inline
def exp(y):
    """exp(y) in float32 for |y| <= 87, with only +, *, / and a select, so loops over it vectorize (no SVML
    here; math.exp stays a scalar libm call). q = exp(|y|/256) - 1 by its Taylor series, squared 8 times in the
    form (1+q)^2 - 1 = q (2 + q), which keeps q's relative precision; negative y take the reciprocal.
    Measured: max relative error 6.5e-6 on [-30, 30] (1.3e-5 on [-87, 87]); in the Gaussian log-weights kernel
    (B=1024, K=64, 784 features) 46 ms against 126 ms with math.exp, one run on this machine."""
    a = min(abs(y), F32(87.0)) * F32(1.0 / 256.0)
    q = _horner(_EXPM1_C, a) * a
    for _ in range(8):
        q = q * (TWO + q)
    e = ONE + q
    return e if y >= ZERO else ONE / e


@inline
def softplus_neg_abs(a):
    """log1p(exp(a)) for a <= 0, float32, branch-free and vectorizable; |error| < 5e-7 relative to exp(a)."""
    e = _horner(_EXP_C, max(a, _EXP_MIN) * _INV32)  # exp(a/32)
    e = e * e
    e = e * e
    e = e * e
    e = e * e
    t = e * e  # exp(a) = exp(a/32)^32
    s = t / (TWO + t)  # log1p(t) = 2 atanh(t / (2 + t)), s in (0, 1/3]
    return _horner(_ATANH_C, s * s) * s
