"""The trainer's host side: each step's batch, drawn from the counter streams and moved to the device.

A step's batch is the items at positions first..first+b-1 of the epoch's order, binarized (when the likelihood
binarizes) and with their eps, all keyed by (epoch seed, position): a pure function of the step, so it can be
made anywhere, in any order. On the CPU the trainer makes it in line (the cores are busy with the step itself).
On a GPU the host would otherwise be the bottleneck (about 4 ms of Numba noise per batch of 500 at k=5 against
well under 1 ms of device work), so worker threads make the next steps' batches, into pinned memory, while the
device runs the current one: the kernels release the GIL, so the workers really run side by side.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..core import rng
from ..core.hardware import available_cpus

MAX_WORKERS = 8
GPU_SYNC_EVERY = 25  # steps between the GPU's loss read-backs (each one stalls the launch queue)


def default_workers(device: torch.device, processes: int = 1) -> int:
    """Feed threads for a device: none on the CPU; beside a GPU, one per spare core of this process's share of
    them (`processes`: the training processes on this machine, one per GPU under torchrun), up to MAX_WORKERS."""
    return 0 if device.type == "cpu" else max(1, min(MAX_WORKERS, available_cpus() // processes - 1))


def sync_every(device: torch.device) -> int:
    """Steps between loss read-backs: every step on the CPU (free there), GPU_SYNC_EVERY on a GPU."""
    return 1 if device.type == "cpu" else GPU_SYNC_EVERY


class Feed:
    """Makes the (x, eps) of training steps on `device`: x (b, D) float32, eps (b, k, latent_dim).

    `batches(es, order, firsts)` yields them in the order of `firsts`, `workers` steps ahead (0: in line)."""

    def __init__(self, x_train: torch.Tensor, b: int, k: int, latent_dim: int, binarize: bool,
                 device: torch.device, workers: int | None = None, processes: int = 1):
        self.x_train, self.b, self.k, self.latent_dim, self.binarize = x_train, b, k, latent_dim, binarize
        self.device = device
        self.workers = default_workers(device, processes) if workers is None else workers
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="feed") if self.workers else None

    def host_batch(self, es: int, order: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch on the host: the items at positions first..first+b-1 of `order`, and their eps."""
        x = self.x_train[order[first : first + self.b]]
        serial = False if self.workers else None  # a worker is already one of several threads
        if self.binarize:
            x = torch.from_numpy(rng.binarize(x.numpy(), es, first, parallel=serial))
        eps = torch.from_numpy(rng.normal_eps(es, first, self.b, self.k, self.latent_dim, parallel=serial))
        return (x.pin_memory(), eps.pin_memory()) if self.pin else (x, eps)

    def batches(self, es: int, order: torch.Tensor, firsts: Iterable[int]) -> Iterator[tuple[torch.Tensor, ...]]:
        firsts = iter(firsts)
        if self._pool is None:
            for first in firsts:
                yield tuple(t.to(self.device) for t in self.host_batch(es, order, first))
            return
        ahead: deque = deque()
        try:
            while True:
                while len(ahead) < 2 * self.workers and (first := next(firsts, None)) is not None:
                    ahead.append(self._pool.submit(self.host_batch, es, order, first))
                if not ahead:
                    return
                yield tuple(t.to(self.device, non_blocking=True) for t in ahead.popleft().result())
        finally:
            for future in ahead:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
