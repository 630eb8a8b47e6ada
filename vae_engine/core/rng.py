"""Counter-based random numbers: eps and binarization noise as pure functions of (seed, item index).

Every random number the engine uses is a hash of (seed, stream, counter), the counter being derived from the
global index of the input item. So results for a seed do not depend on batch size, chunking, thread count or
backend, and the PyTorch reference and the ONNX Runtime/Numba engine see identical eps.
Generator: the splitmix64 finalizer over key + counter * golden ratio; normals by Box-Muller.
Each kernel has a NumPy twin (`*_numpy`), compared in the tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .fastmath import NUMPY_MAX, PARALLEL_MIN, inline, jit, loaded, numba

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
EPS_STREAM, BINARIZE_STREAM, PRIOR_STREAM = 0, 1, 2  # PRIOR_STREAM: a mixture prior's component
OBSERVATION_STREAM = 3  # x ~ p(x|z) of a likelihood with real values (decode --sample)
SHUFFLE_STREAM = 4  # training: the order of an epoch's items


def _mix_int(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)  # a merged batch asks once per request, mostly for the same few seeds
def stream_key(seed: int, stream: int) -> np.uint64:
    """The 64-bit key of one random stream of a seed."""
    return np.uint64(_mix_int((int(seed) * _GOLDEN + stream) & _MASK))


# ---- Numba kernels ----

_G, _M1, _M2 = np.uint64(_GOLDEN), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53
EPS_PARTS = 16  # slices of each item's samples the parallel eps kernel spreads over the cores
# values from which eps is drawn in parallel: each costs ~22 ns (a typical kernel's element ~1 ns), so a parallel
# launch pays far below PARALLEL_MIN; measured 2.0x serial's speed from 3,200 values up (2-core AVX2 EPYC, idle
# cores), and the k=5000 evaluation's blocks (750,000 values) were drawn serially under PARALLEL_MIN
EPS_PARALLEL_MIN = PARALLEL_MIN // 16


@inline
def _uniform(key, counter):
    x = key + counter * _G
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    x = x ^ (x >> _S31)
    return (float(x >> _S11) + 0.5) * _INV53  # in (0, 1), never 0, so log() is finite


def _make_normal_kernel(parallel: bool):
    def kernel(keys, items, k_total, s0, out):  # out (N, K', D) float32: samples s0..s0+K'-1 of k_total
        n, k, d = out.shape
        row = k * d
        flat = out.reshape(n, row)
        parts = EPS_PARTS if parallel else 1
        # each item's Box-Muller pairs in `parts` slices, the loop over (item, slice): the cores share a block
        # of a few items with thousands of samples each (k=5000: three items) evenly
        for t in numba.prange(n * parts):
            b, part = t // parts, t % parts
            key = keys[b]  # item b reads stream keys[b] at item index items[b]
            base = items[b] * (k_total * d) + s0 * d
            # Box-Muller turns one pair of uniforms into two normals: walk the pairs covering this item's range
            first, last = base >> 1, (base + row - 1) >> 1
            size = (last - first + parts) // parts
            for pair in range(first + part * size, min(last + 1, first + (part + 1) * size)):
                p = np.uint64(pair)
                u1 = _uniform(key, p * np.uint64(2))
                u2 = _uniform(key, p * np.uint64(2) + np.uint64(1))
                r = math.sqrt(-2.0 * math.log(u1))
                j0 = 2 * pair - base
                if j0 >= 0:
                    flat[b, j0] = r * math.cos(2.0 * math.pi * u2)
                if j0 + 1 < row:
                    flat[b, j0 + 1] = r * math.sin(2.0 * math.pi * u2)
    return jit(kernel, parallel)


def _make_binarize_kernel(parallel: bool):
    def kernel(keys, items, x, out):  # x, out (N, P) float32
        n, p = x.shape
        for b in numba.prange(n):
            key, base = keys[b], np.uint64(items[b]) * np.uint64(p)
            for i in range(p):
                out[b, i] = 1.0 if _uniform(key, base + np.uint64(i)) < x[b, i] else 0.0
    return jit(kernel, parallel)


_normal_kernels = (_make_normal_kernel(False), _make_normal_kernel(True))
_binarize_kernels = (_make_binarize_kernel(False), _make_binarize_kernel(True))


def run_of(seed: int, start: int, n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, item indices) of items start..start+n-1 of one seed's stream: what the kernels take per item."""
    return run_of_indices(stream_key(seed, stream), start, n, 1)


def run_of_indices(key: np.uint64, first: int, n: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, item indices) of n items of one stream key reading indices first, first+step, ... (step 0: all
    the same index)."""
    return np.full(n, key, np.uint64), first + step * np.arange(n, dtype=np.int64)


def normal_eps(seed: int, start: int, n: int, k: int, d: int, s0: int = 0, s1: int | None = None,
               stream: int = EPS_STREAM, parallel: bool | None = None) -> np.ndarray:
    """eps (n, s1-s0, d) float32 ~ N(0, I) for items start..start+n-1: their samples s0..s1-1 of k.

    Any block of samples is the same numbers as that slice of all k, so long K streams in bounded memory.
    `parallel`: None picks by size (EPS_PARALLEL_MIN); False for callers that are themselves one of several threads
    (the trainer's feed), which gain nothing from a parallel launch and must not depend on the threading layer
    taking launches from several threads at once (Numba's fallback layer, workqueue, does not).
    """
    return normal_eps_items(*run_of(seed, start, n, stream), k, d, s0, s1, parallel)


def normal_eps_items(keys: np.ndarray, items: np.ndarray, k: int, d: int, s0: int = 0, s1: int | None = None,
                     parallel: bool | None = None) -> np.ndarray:
    """`normal_eps` for items that each name their own stream: item b reads stream keys[b] (uint64) at item index
    items[b] (int64); one kernel call however many requests a batch merges. Up to `NUMPY_MAX` values are drawn by
    the NumPy twin (the very same numbers) while Numba is not loaded."""
    s1 = k if s1 is None else s1
    if not loaded() and len(keys) * (s1 - s0) * d <= NUMPY_MAX:
        return normal_eps_items_numpy(keys, items, k, d, s0, s1)
    out = np.empty((len(keys), s1 - s0, d), dtype=np.float32)
    _normal_kernels[out.size >= EPS_PARALLEL_MIN if parallel is None else parallel](
        keys, items, np.int64(k), np.int64(s0), out)
    return out


def normal_eps_torch(keys: np.ndarray, items: np.ndarray, k: int, d: int, s0: int, s1: int, device):
    """`normal_eps_items` computed by torch on `device` (a GPU, next to the decoder that uses them, instead of
    making and copying (n, K', d) floats on the host); float32 tensor (n, s1-s0, d). The same hash in int64
    arithmetic (products wrap alike, shifts masked to be logical) and Box-Muller in float64, one element at a time
    as the NumPy twin."""
    import torch

    def logical_shift(x, bits):
        return (x >> bits) & ((1 << (64 - bits)) - 1)

    def uniform(key, counter):
        x = key + counter * _signed(_GOLDEN)
        x = (x ^ logical_shift(x, 30)) * _signed(0xBF58476D1CE4E5B9)
        x = (x ^ logical_shift(x, 27)) * _signed(0x94D049BB133111EB)
        x = x ^ logical_shift(x, 31)
        return (logical_shift(x, 11).double() + 0.5) * _INV53

    row = (s1 - s0) * d
    key = torch.from_numpy(keys.view(np.int64)).to(device)[:, None]
    item = torch.from_numpy(np.ascontiguousarray(items, np.int64)).to(device)[:, None]
    j = item * (k * d) + s0 * d + torch.arange(row, device=device, dtype=torch.int64)  # (n, row)
    pair = (j >> 1) * 2
    r = torch.sqrt(-2.0 * torch.log(uniform(key, pair)))
    angle = (2.0 * math.pi) * uniform(key, pair + 1)
    z = torch.where((j & 1).bool(), r * torch.sin(angle), r * torch.cos(angle))
    return z.float().reshape(len(keys), s1 - s0, d)


def _signed(u: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


@dataclass(frozen=True)
class Streams:
    """Which eps stream each item of a batch reads: runs of (seed, first item index, items, step).

    step 1: consecutive item indices (a file's rows, the default everywhere); step 0: every item of the run reads
    the same index (common random numbers, so a score depends on the item alone). Batches merged from several
    requests (the server) concatenate their runs, so each item keeps the stream it would have had alone.
    """

    runs: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def contiguous(cls, seed: int, start: int, n: int) -> Streams:
        return cls(((int(seed), int(start), int(n), 1),))

    @classmethod
    def shared(cls, seed: int, index: int, n: int) -> Streams:
        return cls(((int(seed), int(index), int(n), 0),))

    @classmethod
    def concat(cls, parts) -> Streams:
        return cls(tuple(run for part in parts for run in part.runs))

    def __len__(self) -> int:
        return sum(run[2] for run in self.runs)

    def eps(self, i: int, j: int, k: int, d: int, s0: int = 0, s1: int | None = None, device=None):
        """eps (j-i, s1-s0, d) float32 of the batch's items i..j-1: their samples s0..s1-1 of k; a NumPy array, or
        with `device` (a torch device) a tensor made there by `normal_eps_torch` (the same numbers)."""
        keys, items = self.keys_and_items(i, j)
        if device is not None:
            return normal_eps_torch(keys, items, k, d, s0, k if s1 is None else s1, device=device)
        if len(self.runs) == 1 and self.runs[0][3] == 0:  # one shared stream: made once, copied to every item
            one = normal_eps_items(keys[:1], items[:1], k, d, s0, s1)
            return np.ascontiguousarray(np.broadcast_to(one, (len(keys), *one.shape[1:])))
        return normal_eps_items(keys, items, k, d, s0, s1)

    def keys_and_items(self, i: int, j: int, stream: int = EPS_STREAM) -> tuple[np.ndarray, np.ndarray]:
        """Each of the batch's items i..j-1: its stream's key (uint64) and the item index it reads (int64). The
        runs are walked in Python and expanded by a fixed number of NumPy calls, however many requests merged."""
        keys, bases, steps, counts, offset = [], [], [], [], 0
        for seed, first, n, step in self.runs:
            a, b = max(i, offset), min(j, offset + n)
            if a < b:
                keys.append(stream_key(seed, stream))
                bases.append(first + (a - offset) * step)
                steps.append(step)
                counts.append(b - a)
            offset += n
        if len(keys) == 1:
            return run_of_indices(keys[0], bases[0], counts[0], steps[0])
        counts_a = np.asarray(counts, np.int64)
        starts = np.repeat(np.cumsum(counts_a) - counts_a, counts_a)  # where each item's run begins, per item
        within = np.arange(len(starts), dtype=np.int64) - starts
        items = np.repeat(np.asarray(bases, np.int64), counts_a) + within * np.repeat(np.asarray(steps, np.int64),
                                                                                     counts_a)
        return np.repeat(np.asarray(keys, np.uint64), counts_a), items

    def binarize(self, x: np.ndarray) -> np.ndarray:
        """Bernoulli(x) pixels (N, P) float32 of the batch's items, each from its own binarization stream."""
        return binarize_items(x, *self.keys_and_items(0, len(x), BINARIZE_STREAM))


def iwae_blocks(streams: Streams, k: int, d: int, rows: int, device=None, samples: tuple[int, int] | None = None):
    """The eps of an IWAE estimate over a batch's items (k samples each, from their `streams`), in blocks of
    about `rows` decoder rows: yields (i, j, s, eps) with eps (j-i, K', D) = samples s..s+K'-1 of items i..j-1
    (tensors made on `device` when one is given: see `Streams.eps`). `samples` (s0, s1): only those samples of
    the k (a server's slice of a long request); default all.

    Items are grouped rows // k at a time; when one item's k samples exceed `rows`, K itself is split. Each block
    is a slice of the items' own streams, so any blocking gives the same numbers, in bounded memory.
    """
    s0, s1 = samples or (0, k)
    n, per_item = len(streams), max(1, rows // (s1 - s0))
    for i in range(0, n, per_item):
        j = min(n, i + per_item)
        for s in range(s0, s1, rows):
            yield i, j, s, streams.eps(i, j, k, d, s, min(s1, s + rows), device)


def iwae_log_sums(streams: Streams, k: int, d: int, rows: int, block_log_sum, device=None,
                  samples: tuple[int, int] | None = None) -> np.ndarray:
    """log sum_s w_s per item (n,) float64 over samples s0..s1 of k, block by block (`iwae_blocks`):
    `block_log_sum(i, j, eps)` gives log sum_s w_s over one block's samples for items i..j-1, and the blocks of an
    item combine by log-sum-exp. The one blocked log-sum-exp of the engine and of its PyTorch reference."""
    s0 = samples[0] if samples else 0
    out = np.empty(len(streams))
    for i, j, s, eps in iwae_blocks(streams, k, d, rows, device, samples):
        block = np.asarray(block_log_sum(i, j, eps), np.float64)
        out[i:j] = block if s == s0 else np.logaddexp(out[i:j], block)
    return out


def binarize(x: np.ndarray, seed: int, start: int, parallel: bool | None = None) -> np.ndarray:
    """Bernoulli(x) pixels (n, P) float32 for items start..start+n-1, x in [0, 1] (`parallel`: as `normal_eps`)."""
    return binarize_items(x, *run_of(seed, start, len(x), BINARIZE_STREAM), parallel)


def binarize_items(x: np.ndarray, keys: np.ndarray, items: np.ndarray, parallel: bool | None = None) -> np.ndarray:
    """`binarize` for items that each name their own stream (as `normal_eps_items`): one kernel call (the NumPy
    twin, the same pixels, for up to `NUMPY_MAX` values while Numba is not loaded)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not loaded() and x.size <= NUMPY_MAX:
        return binarize_items_numpy(x, keys, items)
    out = np.empty_like(x)
    _binarize_kernels[x.size >= PARALLEL_MIN if parallel is None else parallel](keys, items, x, out)
    return out


def permutation(seed: int, n: int) -> np.ndarray:
    """A permutation of 0..n-1 (int64) keyed by seed: the items sorted by their uniform of the shuffle stream."""
    return np.argsort(uniforms(seed, SHUFFLE_STREAM, 0, n), kind="stable")


def uniform_rows(seed: int, stream: int, start: int, n: int, d: int) -> np.ndarray:
    """Uniforms in (0, 1), float64 (n, d): feature i of items start..start+n-1 of a stream (for BINARIZE_STREAM,
    the very uniforms `binarize` compares with)."""
    counters = np.uint64(start) * np.uint64(d) + np.arange(n * d, dtype=np.uint64)
    return _uniform_numpy(stream_key(seed, stream), counters).reshape(n, d)


def uniforms(seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """One uniform in (0, 1) per item start..start+n-1 of a stream, float64 (n,) (small draws: NumPy is enough)."""
    return _uniform_numpy(stream_key(seed, stream), np.uint64(start) + np.arange(n, dtype=np.uint64))


# ---- NumPy twins (the reference the kernels are tested against) ----


def _uniform_numpy(key: np.uint64, counter: np.ndarray) -> np.ndarray:
    x = key + counter * _G
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    x = x ^ (x >> _S31)
    return ((x >> _S11).astype(np.float64) + 0.5) * _INV53


def normal_eps_numpy(seed: int, start: int, n: int, k: int, d: int, s0: int = 0, s1: int | None = None,
                     stream: int = EPS_STREAM) -> np.ndarray:
    """NumPy twin of normal_eps."""
    return normal_eps_items_numpy(*run_of(seed, start, n, stream), k, d, s0, s1)


def normal_eps_items_numpy(keys: np.ndarray, items: np.ndarray, k: int, d: int, s0: int = 0,
                           s1: int | None = None) -> np.ndarray:
    """NumPy twin of normal_eps_items: each item's Box-Muller pairs covering its range, both normals of each pair,
    then the item's values cut out of them (a range may start on a pair's second value)."""
    s1 = k if s1 is None else s1
    n, row = len(keys), (s1 - s0) * d
    base = np.asarray(items, np.int64).astype(np.uint64) * np.uint64(k * d) + np.uint64(s0 * d)
    pair = (base >> np.uint64(1))[:, None] + np.arange(row // 2 + 1, dtype=np.uint64)
    key = np.asarray(keys, np.uint64)[:, None]
    r = np.sqrt(-2.0 * np.log(_uniform_numpy(key, pair * np.uint64(2))))
    angle = 2.0 * np.pi * _uniform_numpy(key, pair * np.uint64(2) + np.uint64(1))
    both = np.empty((n, 2 * pair.shape[1]), np.float64)
    both[:, 0::2], both[:, 1::2] = r * np.cos(angle), r * np.sin(angle)
    cut = (base & np.uint64(1)).astype(np.int64)[:, None] + np.arange(row, dtype=np.int64)
    return np.take_along_axis(both, cut, axis=1).astype(np.float32).reshape(n, s1 - s0, d)


def binarize_numpy(x: np.ndarray, seed: int, start: int) -> np.ndarray:
    """NumPy twin of binarize."""
    return binarize_items_numpy(x, *run_of(seed, start, len(x), BINARIZE_STREAM))


def binarize_items_numpy(x: np.ndarray, keys: np.ndarray, items: np.ndarray) -> np.ndarray:
    """NumPy twin of binarize_items: feature i of item b compares with uniform (items[b] * P + i) of keys[b]."""
    n, p = x.shape
    counters = np.asarray(items, np.int64).astype(np.uint64)[:, None] * np.uint64(p) + np.arange(p, dtype=np.uint64)
    return (_uniform_numpy(np.asarray(keys, np.uint64)[:, None], counters) < x).astype(np.float32)
