"""The served model, independent of transport: the engine, the detector and the batcher behind every protocol
(/v1 JSON, the Open Inference Protocol over REST and gRPC). Each request is checked alone (`App.prepare`, the same
input rule as the offline jobs) before it joins a batch; `App.run_batch` answers a merged batch with each item's own
random stream, as the jobs do; `App.tracked` and `App.failure` are the one metrics and error policy."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import modeldir
from ..anomaly import rules
from ..core import rng
from ..core.config import VERSION, check_int
from ..core.errors import DataError, VaeEngineError
from ..jobs.batch import score_items, scored_items
from . import oip
from .batcher import Metrics, MicroBatcher
from .oip import RequestError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is a 4xx with the limit named."""

    max_body_bytes: int = 16 << 20  # request body
    max_items: int = 4096  # items (or latents, or samples) per request
    max_k: int = 5000  # importance samples per item (score)
    timeout_s: float = 30.0  # from arrival to answer; then 504
    max_work: int | None = None  # decoder rows per request (items x k); None: a quarter of the timeout's worth at
    #                              the decoder rate measured at start-up (`App.work_limit`)


SLICE_SECONDS = 0.004  # engine time of one slice of a long request: the most a small request arriving meanwhile
#                        waits behind it on the one engine thread (one-item encodes answer in ~1 ms here)
SCORED_ROW_COST = 2.0  # a scored decoder row (the likelihood and log-weight kernels after the decoder) against a
#                        decoded one: score k=64 ran at ~150k rows/s where decode ran at ~340k (2-core AVX-512 EPYC)


@dataclass
class _Tracked:
    endpoint: str
    code: int = 200
    t0: float = field(default_factory=time.perf_counter)


# ---- request parsing and checking (before batching) ----

def _int(value, name: str, lo: int, hi: int) -> int:
    """A request's integer parameter (a JSON number, or the text of a query parameter), by the project's one
    integer check (`config.check_int`), a 422 when it fails."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise RequestError(422, f"{name} must be an integer, got {value!r}") from None
    try:
        return check_int(name, value, lo, hi)
    except VaeEngineError as exc:
        raise RequestError(422, str(exc)) from None


def retry_after(exc: Exception) -> list[tuple[str, str]]:
    """The Retry-After header of a refusal that says when to come back (a 503), else none."""
    seconds = getattr(exc, "retry_after", None)
    return [("retry-after", str(seconds))] if seconds else []


class Disconnect:
    """Whether an HTTP client went away after its request was read: a task reading the ASGI `receive` channel
    until `http.disconnect` (what starlette's `is_disconnected` polls), started once the body is in."""

    def __init__(self, receive):
        self.receive, self.gone, self.task = receive, False, None

    def start(self) -> None:
        async def watch():
            while (await self.receive())["type"] != "http.disconnect":
                pass
            self.gone = True

        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(watch())

    def __call__(self) -> bool:
        return self.gone

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


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
        from ..runtime.engine import Engine

        self.model_dir, self.limits = Path(model_dir), limits or Limits()
        self.engine = Engine.load(model_dir, backend=backend, precision=precision, threads=threads, device=device,
                                  batch_size=max_batch, max_nll_change=max_nll_change)
        self.engine.warm_up(kernels=False)  # the graphs before the first request, not in it; the kernels below
        self.cfg, self.metrics, self.path = self.engine.cfg, Metrics(), self.engine.path  # path: once, not per request
        self.rows_per_s = self._decoder_rate()
        # decoder rows of one slice of a long request: SLICE_SECONDS of scored rows at the measured rate
        self.slice_rows = max(64, int(self.rows_per_s * SLICE_SECONDS / SCORED_ROW_COST))
        # the most decoder rows one request may ask for: a quarter of the timeout at the measured decoder rate,
        # so that a scored request alone ends within about half of it
        self.work_limit = self.limits.max_work or max(self.slice_rows,
                                                      int(self.rows_per_s * self.limits.timeout_s / 4))
        self.sliced = {"requests": 0, "rows": 0}  # long requests running in slices, and the rows they have left
        self.detector = None
        if (self.model_dir / "detector.json").is_file():
            from ..anomaly.rules import StoredDetector

            # scored by the server's own engine (its threshold was calibrated on fp32; see the detector's docs)
            self.detector = StoredDetector.load(self.model_dir, engine=self.engine)
        # Numba's set-up and the kernels (~0.6 s) load just after the server is ready, on their own thread, beside
        # requests: until then the input rule runs on NumPy (same results) and a first score request waits for
        # the kernel it needs, which loads once, under one lock
        self.kernels_loaded = threading.Event()
        threading.Thread(target=self._warm_kernels, name="warm-kernels", daemon=True).start()
        self.active = 0  # requests received and not yet answered (the batcher waits only while others exist)
        self.batcher = MicroBatcher(self.run_batch, max_batch, max_wait_ms / 1000, self.metrics, lambda: self.active)
        self.max_batch, self.max_wait_ms, self._map = max_batch, max_wait_ms, None
        self.models = oip.model_specs(self.model_dir.name, tuple(self.cfg.input_shape), self.engine.latent_shape,
                                      self.detector is not None,  # the Open Inference Protocol's models
                                      not self.cfg.cannot_score)

    # -- the Open Inference Protocol (v2): the same checks, batcher and answers as /v1 --

    def model(self, name: str, version: str | None = None) -> oip.ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise RequestError(404, f"no model {name!r} here; this server has {', '.join(self.models)}")
        if version not in (None, "", oip.VERSION):
            raise RequestError(404, f"model {name!r} has no version {version!r}; it has version {oip.VERSION}")
        return spec

    async def infer(self, name: str, version: str | None, arrays: dict, params: dict, wanted: dict | None,
                    cancelled: Callable[[], bool] | None = None,
                    time_left: float | None = None) -> tuple[oip.ModelSpec, dict[str, np.ndarray]]:
        """One v2 inference request (decoded by its transport) -> (its model, the outputs by name); `cancelled`
        and `time_left` as `answer` takes them."""
        spec = self.model(name, version)
        a, options = oip.check_request(spec, arrays, params, wanted)
        answer = await self.answer(*self.prepare(spec.op, a, options), cancelled=cancelled, time_left=time_left)
        return spec, oip.outputs_of(spec, answer)

    async def answer(self, key: tuple, payload: dict, n: int, cancelled: Callable[[], bool] | None = None,
                     time_left: float | None = None) -> dict:
        """A prepared request's answer within the server's timeout (or the client's `time_left`, a gRPC deadline),
        every protocol's: its work admitted (`admit`), then from the batcher, or, when it is long, in slices of
        `slice_rows` decoder rows interleaved with the requests that arrive meanwhile, stopped at the next slice
        when its deadline passes or `cancelled()` (the client went away) says so."""
        work = self.work(key[0], payload, n)
        self.admit(work)
        timeout = self.limits.timeout_s if time_left is None else max(0.0, min(self.limits.timeout_s, time_left))
        if work <= self.slice_rows or key[0] not in ("score", "detect"):
            return await self.batcher.submit(key, payload, n, work, timeout)
        return await self._in_slices(key, payload, n, work, cancelled, time.perf_counter() + timeout)

    def work(self, op: str, payload: dict, n: int) -> int:
        """A request's cost in decoder rows: items x k for score (and for a detector's likelihood rules), n for
        sample, items otherwise."""
        if op == "detect" and self.detector is not None and self.detector.rule.startswith("nll"):
            return n * int(self.detector.doc["k"])
        return n * payload.get("k", 1) if op == "score" else n

    def admit(self, work: int) -> None:
        """Refuse work this server cannot do in time: past `work_limit` a 413 that says what to send instead;
        a long request that could not end before its deadline beside the long ones already running a 503 with
        Retry-After (when they are expected to be done)."""
        if work > self.work_limit:
            self.metrics.refused.labels("work").inc()
            raise RequestError(413, f"this request is {work:,} decoder rows (items x k); one request may ask for "
                                    f"{self.work_limit:,} here ({self.limits.timeout_s:g} s timeout at the measured "
                                    "rate): send fewer items or a smaller k, or run `vae-engine score` as a batch job")
        if work <= self.slice_rows or not self.sliced["requests"]:
            return
        rate = self.rows_per_s / SCORED_ROW_COST
        share = self.sliced["requests"] + 1  # the long requests share the engine thread slice by slice
        if work * share / rate > self.limits.timeout_s:
            self.metrics.refused.labels("busy").inc()
            wait = max(1, math.ceil(self.sliced["rows"] / rate))
            raise RequestError(503, f"the server is busy with {self.sliced['requests']} long request(s); this one "
                                    f"({work:,} decoder rows) could not end within {self.limits.timeout_s:g} s: "
                                    f"retry in {wait} s, or send fewer items or a smaller k", retry_after=wait)

    async def _in_slices(self, key: tuple, payload: dict, n: int, work: int, cancelled, t_end: float) -> dict:
        """A long score or detect request as engine calls of at most `slice_rows` decoder rows: items, and for a
        large k the samples of each item, in order; each part reads its items' own streams, so the answer is the
        unsliced one (score: partial log-sums combined in float64)."""
        k = max(1, work // n)
        by_samples = key[0] == "score" and k > 1  # the IWAE's samples split too, as partial log-sums
        items, samples = max(1, self.slice_rows // k), min(k, self.slice_rows) if by_samples else k
        self.sliced["requests"] += 1
        self.sliced["rows"] += work
        left = work
        try:
            out = []
            for i in range(0, n, items):
                j = min(n, i + items)
                parts = []
                for s0 in range(0, k, samples):
                    self._check_alive(cancelled, t_end)
                    s1 = min(k, s0 + samples)
                    parts.append(await self.batcher.call(self._slice, key, payload, i, j, (s0, s1) if by_samples
                                                         else None))
                    self.sliced["rows"] -= (j - i) * (s1 - s0)
                    left -= (j - i) * (s1 - s0)
                out.append(parts)
        finally:
            self.sliced["requests"] -= 1
            self.sliced["rows"] -= left
        if not by_samples:  # each slice is the batch's own answer for its items
            return {name: np.concatenate([p[0][name] for p in out]) for name in out[0][0]}
        log_sum = np.concatenate([np.logaddexp.reduce(np.stack(parts), axis=0) for parts in out])
        return {"scores": -(log_sum - np.log(k))}  # the IWAE NLL

    def _check_alive(self, cancelled, t_end: float) -> None:
        """Between slices: past the deadline, a 504; a client that went away, a 499 nobody reads."""
        if time.perf_counter() > t_end:
            self.metrics.cancelled.labels("deadline").inc()
            raise asyncio.TimeoutError
        if cancelled is not None and cancelled():
            self.metrics.cancelled.labels("disconnect").inc()
            raise RequestError(499, "the client closed the request")

    def _slice(self, key: tuple, payload: dict, i: int, j: int, samples: tuple[int, int] | None):
        """One slice of a long request, on the engine thread: the batch's own answer for items i..j-1, or with
        `samples` (s0, s1) the log-sum of their importance weights s0..s1-1 (a slice of an IWAE estimate)."""
        part = {**payload, "x": payload["x"][i:j], "start": payload.get("start", 0) + i}
        if samples is None:
            return self.run_batch(key, [part])[0]
        streams = rng.Streams.contiguous(part["seed"], part["start"], j - i)
        x = scored_items(self.engine, part["x"], streams, key[2])
        return self.engine.log_weight_sums(x, key[1], *samples, streams=streams)

    def _decoder_rate(self) -> float:
        """Decoder rows per second of this server's path: two calls of 1,024 rows after a first; for large items
        (fewer rows per call, `ModelConfig.chunk_rows`: an imported image autoencoder takes seconds a row) one
        call of one row, the warm-up's decode having been the first."""
        rows, calls = (1024, 2) if self.cfg.chunk_rows >= 1024 else (1, 1)
        z = np.zeros((rows, self.engine.latent_dim), np.float32)
        if calls > 1:
            self.engine.backend.decode(z)
        t0 = time.perf_counter()
        for _ in range(calls):
            self.engine.backend.decode(z)
        return rows * calls / max(time.perf_counter() - t0, 1e-6)

    # -- parse: request -> (key, payload, items); all checks happen here, per request --

    def parse(self, op: str, body: dict, npy: np.ndarray | None) -> tuple[tuple, dict, int]:
        """A /v1 request: the JSON body (or the query of a .npy body) and the .npy array."""
        name = oip.OPERATIONS[op][0]
        a = None if name is None else npy if npy is not None else _array(body.get(name), name)
        return self.prepare(op, a, body)

    def prepare(self, op: str, a: np.ndarray | None, options: dict) -> tuple[tuple, dict, int]:
        """(batcher key, payload, items) of one request of any protocol: its array and options, checked against
        the operation's declaration (`oip.OPERATIONS`, `oip.PARAMETERS`)."""
        field, _, names, _ = oip.OPERATIONS[op]
        opts = {name: self._option(options, name) for name in names}
        if op == "sample":
            return (op,), opts, opts["n"]
        if len(a) > self.limits.max_items:
            raise RequestError(413, f"{len(a)} {field} in one request; the limit is {self.limits.max_items}")
        try:
            a = self.engine.prepare_latents(a, field) if op == "decode" else self.engine.prepare_items(a, field)
        except DataError as exc:
            raise RequestError(422, str(exc)) from None
        if op == "detect" and self.detector is None:
            raise RequestError(404, "this model has no detector.json; train with --contamination to add one")
        key = (op, opts["k"], opts["binarize"]) if op == "score" else (op,)
        return key, {"x": a, **opts}, len(a)

    def _option(self, options: dict, name: str) -> int | bool:
        p = oip.PARAMETERS[name]
        value = options.get(name, p.default)
        if p.kind is bool:
            return _bool(value, name)
        return _int(value, name, p.lo, getattr(self.limits, p.hi) if isinstance(p.hi, str) else p.hi)

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
            self.metrics.answered(t.endpoint, t.code, time.perf_counter() - t.t0)

    def failure(self, exc: Exception) -> tuple[int, str]:
        """(status, one line) for an exception a request ended in; never a traceback."""
        if isinstance(exc, RequestError):
            return exc.status, exc.message
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # distinct classes before Python 3.11
            return 504, f"no answer within {self.limits.timeout_s} s; try fewer items or a smaller k"
        if isinstance(exc, VaeEngineError):
            return 422, str(exc)
        return 500, f"internal error ({type(exc).__name__})"

    async def infer_rest(self, name: str, version: str | None, headers: Mapping[str, str],
                         chunks: AsyncIterator[bytes], cancelled: Callable[[], bool] | None = None
                         ) -> tuple[int, bytes, list[tuple[str, str]]]:
        """A v2 REST inference request -> (status, body, headers): JSON or binary tensors (the binary tensor data
        extension), errors as {"error": "one line"} (a 503 with Retry-After)."""
        with self.tracked("v2") as t:
            try:
                t.endpoint = f"v2/{self.model(name, version).op}"
                raw = oip.decompress(await read_limited(headers, chunks, self.limits.max_body_bytes),
                                     headers.get("content-encoding"), self.limits.max_body_bytes)
                header, binary = oip.split_body(raw, headers.get(oip.HEADER))
                arrays, params, wanted, all_binary = oip.parse_http(header, binary)
                spec, outputs = await self.infer(name, version, arrays, params, wanted, cancelled)
                body, json_length = oip.response_http(spec, header.get("id"), outputs, wanted, all_binary)
            except Exception as exc:  # noqa: BLE001 - one line to the caller (App.failure), never a traceback
                t.code, message = self.failure(exc)
                return t.code, dumps({"error": message}), [("content-type", "application/json"),
                                                          *retry_after(exc)]
        if json_length is None:
            return 200, body, [("content-type", "application/json")]
        return 200, body, [("content-type", "application/octet-stream"), (oip.HEADER, str(json_length))]

    def server_metadata(self) -> dict:
        return {"name": "vae-engine", "version": VERSION,
                "extensions": list(oip.EXTENSIONS)}

    # -- run: one merged engine call (on the engine thread) --

    def run_batch(self, key: tuple, payloads: list[dict]) -> list[dict]:
        op, eng = key[0], self.engine
        # where each request's rows end, in Python: np.split costs ~20 us even with nothing to cut, and a NumPy
        # reduction (np.cumsum) just before an ONNX Runtime call slows that call (a lone request: ~30 us in all)
        cuts = list(itertools.accumulate(p["n"] if op == "sample" else len(p["x"]) for p in payloads))[:-1]

        def split(a):
            return np.split(a, cuts) if cuts else [a]

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
            flags = rules.flags(scores, self.detector.offset)
            return [{"scores": s, "flags": f} for s, f in zip(split(scores), split(flags), strict=True)]
        # score: the score job on the merged batch, each item keeping its request's streams
        streams = rng.Streams.concat([rng.Streams.contiguous(p["seed"], p["start"], len(p["x"])) for p in payloads])
        scores = score_items(eng, x, key[1], streams, key[2])
        return [{"scores": part} for part in split(scores)]

    def _warm_kernels(self) -> None:
        try:
            self.engine.warm_kernels()
        finally:
            self.kernels_loaded.set()

    # -- the 2-D map of the model's test items for the page --

    def latent_map(self, n: int = 1500) -> dict:
        if self._map is None:
            from .. import data

            try:
                items, labels = data.load_test_data(modeldir.train_config(self.model_dir))
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
                "latent_shape": list(cfg.latent_shape),
                "likelihood": cfg.likelihood, "path": self.path, "detector": self.detector is not None,
                "detector_rule": self.detector.rule if self.detector else None, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_ms, "limits": self.limits.__dict__, "work_limit": self.work_limit,
                "decoder_rows_per_s": round(self.rows_per_s)}


def _to_json(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


try:  # orjson parses a 784-number body ~6x faster than json and writes NumPy arrays directly: it sets the
    import orjson  # per-request cost of the event loop, which bounds requests/s once batching makes the engine cheap

    def loads(raw: bytes):
        return orjson.loads(raw)

    def dumps(obj) -> bytes:
        return orjson.dumps(obj, default=_to_json, option=orjson.OPT_SERIALIZE_NUMPY)
except ImportError:  # pragma: no cover - the standard library does the same, slower
    def loads(raw: bytes):
        return json.loads(raw)

    def dumps(obj) -> bytes:
        return json.dumps(obj, default=_to_json).encode()


async def read_limited(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int) -> bytes:
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
