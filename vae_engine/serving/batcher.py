"""Latency-bounded micro-batching: concurrent requests of one key merged into engine calls of up to `max_batch`
items within `max_wait_s` of the first, run one at a time on one engine thread; a lone small request is answered at
once on the event loop. And the server's Prometheus metrics, which the batcher feeds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Pending:
    key: tuple
    payload: dict
    n: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by `serve --workers N`: the workers' metrics in one folder


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in a process do not collide). Under
    `serve --workers N` (prometheus_client's multiprocess mode, `MULTIPROC_ENV`) every worker writes its values
    to the shared folder and /metrics reports the sum over the workers, whichever one answers the scrape."""

    def __init__(self):
        import os

        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry()
        self.requests = Counter("vae_requests", "Requests by endpoint and status code", ["endpoint", "code"],
                                registry=self.registry)
        self.latency = Histogram("vae_request_seconds", "Request latency, arrival to answer", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30))
        self.batch_items = Histogram("vae_batch_items", "Items per engine call", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.queue_wait = Histogram("vae_queue_wait_seconds", "Time a request waited to join an engine call",
                                    registry=self.registry,
                                    buckets=(.0001, .0005, .001, .002, .005, .01, .02, .05, .1, .5, 1, 5))
        self.refused = Counter("vae_refused", "Requests refused before any work, by reason (work: past the "
                               "per-request limit; busy: could not end in time beside the long ones running)",
                               ["reason"], registry=self.registry)
        self.cancelled = Counter("vae_cancelled", "Long requests stopped at a slice, by reason (deadline, "
                                 "disconnect)", ["reason"], registry=self.registry)
        self.queue_depth = Gauge("vae_queue_depth", "Requests waiting for the engine or running on it",
                                 registry=self.registry, multiprocess_mode="livesum")
        self._series: dict[tuple[str, int], tuple] = {}

    def answered(self, endpoint: str, code: int, seconds: float) -> None:
        """One request done: counted by endpoint and status, its latency observed. The labelled series are kept
        (prometheus_client's `labels()` checks and locks on every call, a few us a request)."""
        series = self._series.get((endpoint, code))
        if series is None:
            series = self._series[endpoint, code] = (self.requests.labels(endpoint, str(code)),
                                                     self.latency.labels(endpoint))
        series[0].inc()
        series[1].observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()  # every worker's files, summed
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


class MicroBatcher:
    """Merge concurrent requests of one key into engine calls of <= max_batch items within max_wait_s."""

    INLINE_WORK = 64  # a lone request of at most this many items x samples runs on the event loop (~0.1-0.5 ms)

    def __init__(self, run: Callable[[tuple, list[dict]], list[Any]], max_batch: int, max_wait_s: float,
                 metrics: Metrics, active: Callable[[], int] | None = None):
        self.run, self.max_batch, self.max_wait_s, self.metrics = run, max_batch, max_wait_s, metrics
        self.active = active  # requests in the server (arrived, not answered): no one else there, no waiting
        self.queues: dict[tuple, asyncio.Queue] = {}
        self.tasks: list[asyncio.Task] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")  # one engine call at a time
        self.inflight = 0
        self.busy = 0  # engine calls running on the executor

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """fn(*args) on the engine thread (one engine call at a time, batches included)."""
        self.busy += 1
        self._depth()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.busy -= 1
            self._depth()

    def _depth(self) -> None:
        """The queue-depth gauge: requests waiting for the engine and engine calls running."""
        self.metrics.queue_depth.set(self.inflight + self.busy)

    async def submit(self, key: tuple, payload: dict, n: int, work: int | None = None,
                     timeout_s: float | None = None) -> Any:
        """The answer to one request of n items (`work`: items x importance samples, default n), or TimeoutError
        after `timeout_s` in the queue and the engine. The timeout wraps the future alone: no task per request
        (`asyncio.wait_for` around the whole coroutine cost ~75 us of a 0.6 ms one-item request)."""
        small = self.active is not None and (work or n) <= self.INLINE_WORK
        if small and self.active() <= 1:
            await asyncio.sleep(0)  # requests already read and scheduled run first, so "alone" is judged after them
        if small and self.active() <= 1 and not self.busy and not self.inflight:
            # alone in the server and small: answered here, without the two thread hand-offs of the engine
            # thread (about 0.1 ms, as much as the engine call itself); nothing else is waiting meanwhile
            self.metrics.queue_wait.observe(0.0)
            self.metrics.batch_items.observe(n)
            return self.run(key, [payload])[0]
        loop = asyncio.get_running_loop()
        if key not in self.queues:
            self.queues[key] = asyncio.Queue()
            self.tasks.append(loop.create_task(self._collect(key)))
        item = _Pending(key, payload, n, loop.create_future())
        self.inflight += 1
        self._depth()
        try:
            await self.queues[key].put(item)
            return await (item.future if timeout_s is None else asyncio.wait_for(item.future, timeout_s))
        finally:
            self.inflight -= 1
            self._depth()

    async def _collect(self, key: tuple) -> None:
        queue = self.queues[key]
        carry: _Pending | None = None
        while True:
            first = carry or await queue.get()
            carry, batch, n = None, [first], first.n
            deadline = first.arrived + self.max_wait_s
            while n < self.max_batch:
                if self.active is not None and self.active() <= len(batch) and queue.empty():
                    break  # every request in the server is in this batch: waiting could only add latency
                remaining = deadline - time.perf_counter()
                try:
                    nxt = queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):  # not the builtin before Python 3.11
                    break
                if n + nxt.n > self.max_batch:
                    carry = nxt  # starts the next batch
                    break
                batch.append(nxt)
                n += nxt.n
            now = time.perf_counter()
            for p in batch:
                self.metrics.queue_wait.observe(now - p.arrived)
            self.metrics.batch_items.observe(n)
            live = [p for p in batch if not p.future.done()]  # timed-out callers are not computed for
            if not live:
                continue
            try:
                results = await self.call(self.run, key, [p.payload for p in live])
            except Exception:  # a batch that fails as a whole: run its requests alone, so only a bad one fails
                results = []
                for p in live:
                    try:
                        results.append((await self.call(self.run, key, [p.payload]))[0])
                    except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                        results.append(exc)
            for p, r in zip(live, results, strict=True):
                if not p.future.done():
                    (p.future.set_exception if isinstance(r, Exception) else p.future.set_result)(r)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Graceful shutdown: wait until every queued request is answered, then stop the collectors."""
        t_end = time.perf_counter() + timeout_s
        while self.inflight and time.perf_counter() < t_end:
            await asyncio.sleep(0.01)
        for t in self.tasks:
            t.cancel()
        self.executor.shutdown(wait=True)
