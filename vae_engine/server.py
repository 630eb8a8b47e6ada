"""`vae-engine serve`: an HTTP inference server (FastAPI) with latency-bounded micro-batching.

Concurrent requests for the same operation are queued and merged into one engine call of up to `max_batch` items,
or whatever has arrived `max_wait_ms` after the first of them, whichever comes first; engine calls run one at a time
on one worker thread, so requests arriving during a call form the next batch. A batch waits only while other
requests are in the server (arrived, not answered): a lone request runs at once, so batching costs it nothing.

Answers equal the offline jobs': a request's items are numbered from its `start` (default 0) and every random draw
is keyed by (seed, start + i), exactly as item i of a file in `vae-engine score/sample`; a merged batch keeps each
item's own stream
(`rng.Streams.concat`). Every request is checked alone before it joins a batch, so a bad one gets its own 4xx and
never disturbs the others.

Endpoints: POST /v1/{encode,decode,reconstruct,sample,score,detect}, JSON bodies or .npy bodies
(Content-Type: application/x-npy, options as query parameters; Accept: application/x-npy returns .npy);
GET /v1/info, /v1/map, /healthz, /readyz, /metrics (Prometheus), /docs (OpenAPI); / is the browser page.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint, oip, rng
from .config import SEED_MAX
from .errors import DataError, VaeEngineError
from .oip import RequestError

NPY = "application/x-npy"
WEB = Path(__file__).parent / "web"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is a 4xx with the limit named."""

    max_body_bytes: int = 16 << 20  # request body
    max_items: int = 4096  # items (or latents, or samples) per request
    max_k: int = 5000  # importance samples per item (score)
    timeout_s: float = 30.0  # from arrival to answer; then 504


@dataclass
class _Pending:
    key: tuple
    payload: dict
    n: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Tracked:
    endpoint: str
    code: int = 200
    t0: float = field(default_factory=time.perf_counter)


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
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.busy -= 1

    async def submit(self, key: tuple, payload: dict, n: int, work: int | None = None) -> Any:
        """The answer to one request of n items (`work`: items x importance samples, default n)."""
        if (self.active is not None and self.active() <= 1 and not self.busy and not self.inflight
                and (work or n) <= self.INLINE_WORK):
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
        try:
            await self.queues[key].put(item)
            return await item.future
        finally:
            self.inflight -= 1

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
                except (asyncio.QueueEmpty, TimeoutError):
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


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in a process do not collide)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

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

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- request parsing and checking (before batching) ----

def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}]")
    try:
        v = int(value)
    except ValueError:
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {value!r}") from None
    if not lo <= v <= hi:
        raise RequestError(422, f"{name} must be an integer in [{lo}, {hi}], got {v}")
    return v


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(422, f"{name} must be true or false")


def _array(value, name: str) -> np.ndarray:
    """A JSON list of items (nested lists of numbers) -> a float array with at least 2 dims; the engine's input
    rule checks its shape and values (NaN/Inf, and numbers too large for float32, become a 422)."""
    if not isinstance(value, list) or not value:
        raise RequestError(422, f"{name} must be a non-empty list of items")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise RequestError(422, f"{name} must be a rectangular list of numbers") from None
    return a if a.ndim >= 2 else a[None]


class App:
    """The engine, the detector (when the model folder has one) and the batcher behind the HTTP routes."""

    def __init__(self, model_dir: Path, backend: str = "auto", precision: str = "auto", threads: int | None = None,
                 max_batch: int = 256, max_wait_ms: float = 2.0, limits: Limits | None = None,
                 max_nll_change: float | None = None, device: str = "cpu"):
        from .engine import Engine

        self.model_dir, self.limits = Path(model_dir), limits or Limits()
        self.engine = Engine.load(model_dir, backend=backend, precision=precision, threads=threads, device=device,
                                  batch_size=max_batch, max_nll_change=max_nll_change)
        self.cfg, self.metrics, self.path = self.engine.cfg, Metrics(), self.engine.path  # path: once, not per request
        self.detector = None
        if (self.model_dir / "detector.json").is_file():
            from .detector import VAEOutlierDetector

            # scored on the server's own path (its threshold was calibrated on fp32; see the detector's docs)
            self.detector = VAEOutlierDetector.load(self.model_dir, threads=self.engine.threads,
                                                    backend=self.engine.backend.name,
                                                    precision=self.engine.backend.precision)
        self.active = 0  # requests received and not yet answered (the batcher waits only while others exist)
        self.batcher = MicroBatcher(self.run_batch, max_batch, max_wait_ms / 1000, self.metrics, lambda: self.active)
        self.max_batch, self.max_wait_ms, self._map = max_batch, max_wait_ms, None
        self.models = oip.model_specs(self.model_dir.name, tuple(self.cfg.input_shape), self.engine.latent_dim,
                                      self.detector is not None)  # the Open Inference Protocol's models

    # -- the Open Inference Protocol (v2): the same checks, batcher and answers as /v1 --

    def model(self, name: str, version: str | None = None) -> oip.ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise RequestError(404, f"no model {name!r} here; this server has {', '.join(self.models)}")
        if version not in (None, "", oip.VERSION):
            raise RequestError(404, f"model {name!r} has no version {version!r}; it has version {oip.VERSION}")
        return spec

    async def infer(self, name: str, version: str | None, arrays: dict, params: dict,
                    wanted: dict | None) -> tuple[oip.ModelSpec, dict[str, np.ndarray]]:
        """One v2 inference request (decoded by its transport) -> (its model, the outputs by name)."""
        spec = self.model(name, version)
        a, options = oip.check_request(spec, arrays, params, wanted)
        key, payload, n = self.prepare(spec.op, a, options)
        result = await asyncio.wait_for(self.batcher.submit(key, payload, n, n * payload.get("k", 1)),
                                        self.limits.timeout_s)
        return spec, oip.outputs_of(spec, result)

    # -- parse: request -> (key, payload, items); all checks happen here, per request --

    def parse(self, op: str, body: dict, npy: np.ndarray | None) -> tuple[tuple, dict, int]:
        """A /v1 request: the JSON body (or the query of a .npy body) and the .npy array."""
        name = "z" if op == "decode" else "items"
        a = None if op == "sample" else npy if npy is not None else _array(body.get(name), name)
        return self.prepare(op, a, body)

    def prepare(self, op: str, a: np.ndarray | None, options: dict) -> tuple[tuple, dict, int]:
        """(batcher key, payload, items) of one request of any protocol: its array and options, checked."""
        lim = self.limits
        seed = _int(options.get("seed", 0), "seed", 0, SEED_MAX)
        start = _int(options.get("start", 0), "start", 0, 2**40)
        if op == "sample":
            n = _int(options.get("n", 1), "n", 1, lim.max_items)
            return (op,), {"n": n, "seed": seed, "start": start}, n
        name = "z" if op == "decode" else "items"
        if len(a) > lim.max_items:
            raise RequestError(413, f"{len(a)} {name} in one request; the limit is {lim.max_items}")
        try:
            if op == "decode":
                a = self.engine._latents(a, "z")
            else:
                a = self.engine._images(a, "items")
        except DataError as exc:
            raise RequestError(422, str(exc)) from None
        payload = {"x": a, "seed": seed, "start": start}
        if op == "score":
            payload["k"] = _int(options.get("k", 1), "k", 1, lim.max_k)
            payload["binarize"] = _bool(options.get("binarize", True), "binarize")
            return (op, payload["k"]), payload, len(a)
        if op == "detect" and self.detector is None:
            raise RequestError(404, "this model has no detector.json; train with --contamination to add one")
        return (op,), payload, len(a)

    @contextmanager
    def tracked(self, endpoint: str):
        """One request of any protocol: counted as in the server while it runs, then in the metrics by endpoint
        and status (the handler sets `.code` and may refine `.endpoint`)."""
        t = _Tracked(endpoint)
        self.active += 1
        try:
            yield t
        finally:
            self.active -= 1
            self.metrics.requests.labels(t.endpoint, str(t.code)).inc()
            self.metrics.latency.labels(t.endpoint).observe(time.perf_counter() - t.t0)

    def failure(self, exc: Exception) -> tuple[int, str]:
        """(status, one line) for an exception a request ended in; never a traceback."""
        if isinstance(exc, RequestError):
            return exc.status, exc.message
        if isinstance(exc, TimeoutError):
            return 504, f"no answer within {self.limits.timeout_s} s; try fewer items or a smaller k"
        if isinstance(exc, VaeEngineError):
            return 422, str(exc)
        return 500, f"internal error ({type(exc).__name__})"

    async def infer_rest(self, name: str, version: str | None, headers: Mapping[str, str],
                         chunks: AsyncIterator[bytes]) -> tuple[int, bytes, list[tuple[str, str]]]:
        """A v2 REST inference request -> (status, body, headers): JSON or binary tensors (the binary tensor data
        extension), errors as {"error": "one line"}."""
        with self.tracked("v2") as t:
            try:
                t.endpoint = f"v2/{self.model(name, version).op}"
                raw = oip.decompress(await _read_body(headers, chunks, self.limits.max_body_bytes),
                                     headers.get("content-encoding"), self.limits.max_body_bytes)
                header, binary = oip.split_body(raw, headers.get(oip.HEADER))
                arrays, params, wanted, all_binary = oip.parse_http(header, binary)
                spec, outputs = await self.infer(name, version, arrays, params, wanted)
                body, json_length = oip.response_http(spec, header.get("id"), outputs, wanted, all_binary)
            except Exception as exc:  # noqa: BLE001 - one line to the caller (App.failure), never a traceback
                t.code, message = self.failure(exc)
                return t.code, _dumps({"error": message}), [("content-type", "application/json")]
        if json_length is None:
            return 200, body, [("content-type", "application/json")]
        return 200, body, [("content-type", "application/octet-stream"), (oip.HEADER, str(json_length))]

    def server_metadata(self) -> dict:
        return {"name": "vae-engine", "version": __import__("vae_engine").__version__,
                "extensions": list(oip.EXTENSIONS)}

    # -- run: one merged engine call (on the engine thread) --

    def run_batch(self, key: tuple, payloads: list[dict]) -> list[dict]:
        op, eng = key[0], self.engine
        sizes = [p["n"] if op == "sample" else len(p["x"]) for p in payloads]
        cuts = np.cumsum(sizes)[:-1]

        def split(a):
            return np.split(a, cuts)

        if op == "sample":
            z = np.concatenate([eng.prior.sample(p["seed"], p["start"], p["n"]) for p in payloads])  # own streams
            return [{"items": part} for part in split(eng.decode(z))]
        x = np.concatenate([p["x"] for p in payloads]) if len(payloads) > 1 else payloads[0]["x"]
        if op == "encode":
            mu, logvar = eng.backend.encode(x)
            return [{"mu": m, "logvar": v} for m, v in zip(split(mu), split(logvar), strict=True)]
        if op == "decode":
            return [{"items": part} for part in split(eng.decode(x))]
        if op == "reconstruct":
            return [{"items": part} for part in split(eng.reconstruct(x))]
        if op == "detect":
            scores = self.detector.score_samples(x.reshape(len(x), -1))
            flags = np.where(scores < self.detector.offset_, -1, 1)
            return [{"scores": s, "flags": f} for s, f in zip(split(scores), split(flags), strict=True)]
        # score: binarize each request with its own stream, as the score job does; keep each item's eps stream
        k = key[1]
        xs = [rng.binarize(p["x"], p["seed"], p["start"]) if p["binarize"] and eng.likelihood.binarized
              else p["x"] for p in payloads]
        x = np.concatenate(xs)
        streams = rng.Streams.concat([rng.Streams.contiguous(p["seed"], p["start"], len(p["x"])) for p in payloads])
        scores = -eng.elbo(x, streams=streams) if k == 1 else -eng.log_likelihood(x, k, streams=streams)
        return [{"scores": part} for part in split(scores)]

    # -- the 2-D map of the model's test items for the page --

    def latent_map(self, n: int = 1500) -> dict:
        if self._map is None:
            from . import data

            try:
                items, labels = data.load_test_data(checkpoint.train_config(self.model_dir))
            except (VaeEngineError, OSError):
                items, labels = None, None
            if items is None:
                z = self.engine.prior.sample(0, 0, n)
                labels = None
            else:
                idx = np.linspace(0, len(items) - 1, min(n, len(items))).astype(int)
                z = self.engine.encode(data.to_float(items[idx]))[0]
                labels = None if labels is None else labels[idx]
            mean = z.mean(0)
            if z.shape[1] > 2:  # PCA to 2-D; a click maps back with mean + xy @ components
                _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
                comps = vt[:2]
            else:
                comps = np.eye(2, z.shape[1])
            xy = (z - mean) @ comps.T
            self._map = {"xy": xy.round(4).tolist(), "labels": None if labels is None else labels.tolist(),
                         "mean": mean.tolist(), "components": comps.tolist()}
        return self._map

    def info(self) -> dict:
        cfg = self.cfg
        return {"model_dir": str(self.model_dir), "input_shape": list(cfg.input_shape),
                "image_shape": list(cfg.image_shape) if cfg.image_shape else None, "latent_dim": cfg.latent_dim,
                "likelihood": cfg.likelihood, "path": self.path, "detector": self.detector is not None,
                "detector_rule": self.detector.rule if self.detector else None, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_ms, "limits": self.limits.__dict__}


def _to_json(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


try:  # orjson parses a 784-number body ~6x faster than json and writes NumPy arrays directly: it sets the
    import orjson  # per-request cost of the event loop, which bounds requests/s once batching makes the engine cheap

    def _loads(raw: bytes):
        return orjson.loads(raw)

    def _dumps(obj) -> bytes:
        return orjson.dumps(obj, default=_to_json, option=orjson.OPT_SERIALIZE_NUMPY)
except ImportError:  # pragma: no cover - the standard library does the same, slower
    def _loads(raw: bytes):
        return json.loads(raw)

    def _dumps(obj) -> bytes:
        return json.dumps(obj, default=_to_json).encode()


SCHEMAS = {  # request bodies, for the OpenAPI document (JSON; the same fields as query parameters with .npy)
    "encode": {"items": "list of items, each a list (or nested lists) of numbers in the model's input shape"},
    "decode": {"z": "list of latent vectors (latent_dim numbers each)"},
    "reconstruct": {"items": "as for encode"},
    "sample": {"n": "number of samples", "seed": "seed", "start": "index of the first sample's stream"},
    "score": {"items": "as for encode", "k": "1: -ELBO; more: IWAE NLL with k samples", "seed": "seed",
              "start": "index of the first item's stream", "binarize": "binarize Bernoulli inputs first"},
    "detect": {"items": "as for encode"},
}


SUMMARIES = {"encode": "Posterior mean and log-variance of each item", "decode": "E[x|z] of each latent",
             "reconstruct": "Decode each item's posterior mean", "sample": "n samples from the prior, keyed by seed",
             "score": "-ELBO (k=1) or IWAE negative log-likelihood per item, nats",
             "detect": "Anomaly scores and flags (+1/-1) with the stored threshold"}


def _openapi_body(op: str) -> dict:
    props = {name: ({"type": "array", "items": {}} if name in ("items", "z") else
                    {"type": "boolean"} if name == "binarize" else {"type": "integer"}) | {"description": text}
             for name, text in SCHEMAS[op].items()}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "properties": props}},
        NPY: {"schema": {"type": "string", "format": "binary",
                         "description": "a .npy array of items (or latents); options as query parameters"}}}}}


async def _read_body(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A request body of at most `limit` bytes (413 beyond, by Content-Length or as it arrives)."""
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"request body over {limit} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


class V2Infer:
    """Pure ASGI in front of FastAPI and its middleware: POST /v2/models/NAME[/versions/V]/infer goes straight to
    `App.infer_rest`.
    FastAPI's middleware, routing and parameter handling cost about as much per request as everything else a
    one-item request needs (profiled: README, "Load"); the answers are the documented route's, which is the same
    function."""

    PREFIX = "/v2/models/"

    def __init__(self, app, state: dict):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(self.PREFIX) \
                or "app" not in self.state:
            return await self.app(scope, receive, send)
        parts = path[len(self.PREFIX):].split("/")
        if len(parts) == 2 and parts[1] == "infer":
            name, version = parts[0], None
        elif len(parts) == 4 and parts[1] == "versions" and parts[3] == "infer":
            name, version = parts[0], parts[2]
        else:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}  # ASGI: lower-case names

        async def chunks():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        status, body, extra = await self.state["app"].infer_rest(name, version, headers, chunks())
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode())]
                    + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]})
        await send({"type": "http.response.body", "body": body})


def create_app(model_dir: str | Path | None = None, grpc: tuple[str, int, bool] | None = None, **kwargs) -> Any:
    """The FastAPI application serving one model directory (default: the shipped model); with `grpc` (host, port,
    share the port with other worker processes) it also serves the v2 protocol over gRPC on the same event loop."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, Response

    model_dir = checkpoint.resolve_model_dir(model_dir)
    state: dict[str, App] = {}

    def load() -> App:
        """The model, loaded once: at start-up (uvicorn's lifespan) or by the host (a Ray Serve replica)."""
        if "app" not in state:
            state["app"] = App(model_dir, **kwargs)
        return state["app"]

    @asynccontextmanager
    async def lifespan(app):
        import gc

        load()
        grpc_server = None
        if grpc is not None:
            from . import oip_grpc

            grpc_server = await oip_grpc.start(state["app"], *grpc)
        gc.collect()
        gc.freeze()  # the model's and libraries' objects leave the collector's view: no long full collections later
        gc.set_threshold(50_000, 20, 100)  # requests allocate many short-lived objects: collect young ones rarely
        yield
        if grpc_server is not None:
            await grpc_server.stop(state["app"].limits.timeout_s)  # no new calls; running ones finish
        await state["app"].batcher.drain()

    class Api(FastAPI):
        """FastAPI with V2Infer in front of its whole middleware stack."""

        async def __call__(self, scope, receive, send):
            await front(scope, receive, send)

    api = Api(title="vae-engine", version=__import__("vae_engine").__version__, lifespan=lifespan,
                  description="VAE inference with micro-batching: encode, decode, reconstruct, sample, score, detect.")
    api.state.load = load
    front = V2Infer(lambda scope, receive, send: FastAPI.__call__(api, scope, receive, send), state)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request: Request, limits: Limits) -> bytes:
        return await _read_body(request.headers, request.stream(), limits.max_body_bytes)

    async def handle(op: str, request: Request):
        a = state["app"]
        with a.tracked(op) as t:
            try:
                return await answer(a, op, request)
            except Exception as exc:  # noqa: BLE001 - one line to the caller (App.failure), never a traceback
                t.code, message = a.failure(exc)
                return error(t.code, message)

    async def answer(a: App, op: str, request: Request) -> Response:
        raw = await read_body(request, a.limits)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        npy = None
        if ctype == NPY:
            body = dict(request.query_params)
            try:
                npy = np.load(io.BytesIO(raw), allow_pickle=False)
            except (ValueError, OSError, EOFError):
                raise RequestError(400, "body is not a readable .npy array (pickled arrays are refused)") from None
        elif ctype in ("application/json", ""):
            try:
                body = _loads(raw) if raw else {}
            except (ValueError, UnicodeDecodeError):
                raise RequestError(400, "body is not valid JSON") from None
            if not isinstance(body, dict):
                raise RequestError(422, "body must be a JSON object")
        else:
            raise RequestError(415, f"content type {ctype!r}: send application/json or {NPY}")
        key, payload, n = a.parse(op, body, npy)
        result = await asyncio.wait_for(a.batcher.submit(key, payload, n, n * payload.get("k", 1)),
                                        a.limits.timeout_s)
        result["path"] = a.path
        if NPY in request.headers.get("accept", ""):
            main = result.get("items", result.get("scores", result.get("mu")))
            buf = io.BytesIO()
            np.save(buf, np.asarray(main), allow_pickle=False)
            return Response(buf.getvalue(), media_type=NPY)
        return Response(_dumps(result), media_type="application/json")

    def route(op: str):
        async def endpoint(request):
            return await handle(op, request)

        endpoint.__annotations__ = {"request": Request}  # a real class: FastAPI injects the raw request
        return endpoint

    for op in SCHEMAS:
        api.add_api_route(f"/v1/{op}", route(op), methods=["POST"], name=op, openapi_extra=_openapi_body(op),
                          summary=SUMMARIES[op])

    # -- the Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension --

    async def infer_v2(request: Request, name: str, version: str | None = None):
        # the route FastAPI documents; requests normally take the same code through V2Infer, before the routing
        status, body, headers = await state["app"].infer_rest(name, version, request.headers, request.stream())
        return Response(body, status_code=status, headers=dict(headers))

    infer_v2.__annotations__ = {"request": Request, "name": str, "version": str | None}  # real classes, as above

    def v2_model(name: str, version: str | None = None) -> oip.ModelSpec | JSONResponse:
        try:
            return state["app"].model(name, version)
        except RequestError as exc:
            return error(exc.status, exc.message)

    v2 = {"tags": ["Open Inference Protocol (KServe v2)"]}

    @api.get("/v2", summary="Server metadata: name, version, protocol extensions", **v2)
    async def v2_server():
        return state["app"].server_metadata()

    @api.get("/v2/health/live", summary="The process is alive", **v2)
    async def v2_live():
        return {"live": True}

    @api.get("/v2/health/ready", summary="The models are loaded and the server takes requests", **v2)
    async def v2_ready():
        return {"ready": True} if "app" in state else error(503, "loading")

    @api.post("/v2/repository/index", summary="The models this server has, each READY", **v2)
    async def v2_index():
        return [{"name": n, "version": oip.VERSION, "state": "READY"} for n in state["app"].models]

    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        @api.get(base, summary="Model metadata: versions, platform, inputs and outputs (datatype, shape)", **v2)
        async def v2_metadata(name: str, version: str | None = None):
            spec = v2_model(name, version)
            return spec if isinstance(spec, JSONResponse) else spec.metadata()

        @api.get(base + "/ready", summary="The model is ready", **v2)
        async def v2_model_ready(name: str, version: str | None = None):
            spec = v2_model(name, version)
            return spec if isinstance(spec, JSONResponse) else {"name": name, "ready": True}

        @api.get(base + "/config", summary="The model as a Triton model configuration (for Triton's tools)", **v2)
        async def v2_config(name: str, version: str | None = None):
            spec = v2_model(name, version)
            return spec if isinstance(spec, JSONResponse) else oip.triton_config(spec, state["app"].max_batch)

        api.add_api_route(base + "/infer", infer_v2, methods=["POST"], name="v2 infer" + ("" if "version" not in
                                                                                          base else " (version)"),
                          summary="Inference: typed tensors as JSON data or binary (Inference-Header-Content-Length)",
                          **v2)

    @api.get("/v1/info", summary="The model and the serving path")
    async def info():
        return state["app"].info()

    @api.get("/v1/map", summary="2-D map (PCA of posterior means) of the model's test items, with labels")
    async def latent_map():
        a = state["app"]
        return await a.batcher.call(a.latent_map)

    @api.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @api.get("/readyz", summary="The model is loaded and the server takes requests")
    async def readyz():
        return {"status": "ready", "path": state["app"].path} if "app" in state else error(503, "loading")

    @api.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(state["app"].metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    @api.exception_handler(404)
    async def not_found(request, exc):
        return error(404, f"no route {request.url.path}; see /docs")

    @api.exception_handler(405)
    async def not_allowed(request, exc):
        return error(405, f"{request.method} is not allowed on {request.url.path}; see /docs")

    return api


SERVE_ENV = "VAE_ENGINE_SERVE"  # the settings handed to each uvicorn worker process (JSON)


def app_from_env():
    """uvicorn's factory for --workers > 1: every worker process builds the app from the same settings."""
    import os

    settings = json.loads(os.environ[SERVE_ENV])
    settings["limits"] = Limits(**settings["limits"])
    settings["grpc"] = tuple(settings["grpc"]) if settings.get("grpc") else None
    return create_app(settings.pop("model_dir"), **settings)


def _check_port_free(host: str, port: int, option: str) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as exc:
        raise VaeEngineError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another {option}") from None


def serve(model_dir: Path | None, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          limits: Limits | None = None, on_ready: Callable[[], None] | None = None, grpc_port: int | None = None,
          **kwargs) -> None:
    """Run the app with uvicorn; SIGINT/SIGTERM stop taking connections and drain the queue first. With
    workers > 1, uvicorn starts that many processes, each with its own engine and batcher, on one port (and the
    gRPC port, shared by SO_REUSEPORT, when `grpc_port` is given)."""
    import os

    import uvicorn

    limits = limits or Limits()
    if grpc_port is not None:
        try:
            import google.protobuf  # noqa: F401
            import grpc  # noqa: F401
        except ImportError as exc:
            raise VaeEngineError(f"--grpc-port needs grpcio and protobuf ({exc.name} is missing): "
                                 "pip install 'vae-engine[grpc]'") from None
        if workers == 1:
            _check_port_free(host, grpc_port, "--grpc-port")
    grpc = None if grpc_port is None else (host, grpc_port, workers > 1)
    if workers == 1:
        app = create_app(model_dir, limits=limits, grpc=grpc, **kwargs)
        app.state.load()  # here, not in uvicorn's start-up: a bad model folder is one `error:` line
        if on_ready:
            on_ready()
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
        return
    checkpoint.model_config(checkpoint.resolve_model_dir(model_dir))  # a bad folder fails here, once
    if on_ready:
        on_ready()
    os.environ[SERVE_ENV] = json.dumps({"model_dir": str(checkpoint.resolve_model_dir(model_dir)),
                                        "limits": limits.__dict__, "grpc": grpc, **kwargs})
    uvicorn.run("vae_engine.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", timeout_graceful_shutdown=30)
