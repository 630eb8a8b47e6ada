"""`vae-engine serve`: the HTTP routes (FastAPI) over `App`, with latency-bounded micro-batching (`batcher`).

Concurrent requests for the same operation are queued and merged into one engine call of up to `max_batch` items,
or whatever has arrived `max_wait_ms` after the first of them, whichever comes first; engine calls run one at a time
on one worker thread, so requests arriving during a call form the next batch. A batch waits only while other
requests are in the server (arrived, not answered): a lone request runs at once, so batching costs it nothing.

Answers equal the offline jobs': a request's items are numbered from its `start` (default 0) and every random draw
is keyed by (seed, start + i), exactly as item i of a file in `vae-engine score/sample`; a merged batch keeps each
item's own stream (`rng.Streams.concat`). Every request is checked alone before it joins a batch, so a bad one gets
its own 4xx and never disturbs the others.

Endpoints: POST /v1/{encode,decode,reconstruct,sample,score,detect}, JSON bodies or .npy bodies
(Content-Type: application/x-npy, options as query parameters; Accept: application/x-npy returns .npy);
GET /v1/info, /v1/map, /healthz, /readyz, /metrics (Prometheus), /docs (OpenAPI); / is the browser page.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import modeldir
from ..core import hardware
from ..core.config import VERSION
from ..core.errors import VaeEngineError
from . import oip
from .app import App, Disconnect, Limits, dumps, loads, read_limited, retry_after
from .oip import RequestError

NPY = "application/x-npy"
WEB = Path(__file__).parent / "web"


def _openapi_body(op: str) -> dict:
    """The request body of /v1/OP for the OpenAPI document, from the operation's declaration (`oip.OPERATIONS`)."""
    field, doc, names, _ = oip.OPERATIONS[op]
    props = {} if field is None else {field: {"type": "array", "items": {}, "description": doc}}
    for name in names:
        p = oip.PARAMETERS[name]
        props[name] = {"type": "boolean" if p.kind is bool else "integer", "default": p.default,
                       "description": p.doc} | ({} if p.kind is bool else {"minimum": p.lo})
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "properties": props}},
        NPY: {"schema": {"type": "string", "format": "binary",
                         "description": "a .npy array of items (or latents); options as query parameters"}}}}}


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
        gone = Disconnect(receive)

        async def chunks():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.gone = True
                    return
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    gone.start()  # the body is in: from here on, receive() says when the client leaves
                    return

        try:
            status, body, extra = await self.state["app"].infer_rest(name, version, headers, chunks(), gone)
        finally:
            gone.stop()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode())]
                    + [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra]})
        await send({"type": "http.response.body", "body": body})


def create_app(model_dir: str | Path | None = None, grpc: tuple[str, int, bool] | None = None, **kwargs) -> Any:
    """The FastAPI application serving one model directory (default: the shipped model); with `grpc` (host, port,
    share the port with other worker processes) it also serves the v2 protocol over gRPC on the same event loop.
    Routes: `_v1_routes` (the /v1 operations), `_v2_routes` (KServe v2 over REST), `_service_routes` (health,
    metrics, the page, errors)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    model_dir = modeldir.resolve_model_dir(model_dir)
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
        if state["app"].metrics.multiprocess:  # this worker's live gauges leave the sum
            import os

            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    class Api(FastAPI):
        """FastAPI with V2Infer in front of its whole middleware stack."""

        async def __call__(self, scope, receive, send):
            await front(scope, receive, send)

    api = Api(title="vae-engine", version=VERSION, lifespan=lifespan,
              description="VAE inference with micro-batching: encode, decode, reconstruct, sample, score, detect.")
    api.state.load = load
    front = V2Infer(lambda scope, receive, send: FastAPI.__call__(api, scope, receive, send), state)
    _v1_routes(api, state)
    _v2_routes(api, state)
    _service_routes(api, state)
    return api


def _error(status: int, message: str, headers: list[tuple[str, str]] = ()):
    """The JSON error every route answers with: {"error": message}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=dict(headers))


async def _answer_v1(a: App, op: str, request) -> Any:
    """One /v1 request: the body (JSON, or .npy with query parameters) -> the App's answer, as JSON or .npy."""
    from fastapi.responses import Response

    raw = await read_limited(request.headers, request.stream(), a.limits.max_body_bytes)
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
            body = loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(422, "body must be a JSON object")
    else:
        raise RequestError(415, f"content type {ctype!r}: send application/json or {NPY}")
    gone = Disconnect(request.receive)
    gone.start()  # the body is read: receive() now says when the client leaves
    try:
        result = await a.answer(*a.parse(op, body, npy), cancelled=gone)
    finally:
        gone.stop()
    result["path"] = a.path
    if NPY in request.headers.get("accept", ""):
        main = result.get("items", result.get("scores", result.get("mu")))
        buf = io.BytesIO()
        np.save(buf, np.asarray(main), allow_pickle=False)
        return Response(buf.getvalue(), media_type=NPY)
    return Response(dumps(result), media_type="application/json")


def _v1_routes(api, state: dict[str, App]) -> None:
    """POST /v1/{op} for every operation (`oip.OPERATIONS`), and /v1/info and /v1/map."""
    from fastapi import Request

    def route(op: str):
        async def endpoint(request):
            a = state["app"]
            with a.tracked(op) as t:
                try:
                    return await _answer_v1(a, op, request)
                except Exception as exc:  # noqa: BLE001 - one line to the caller (App.failure), never a traceback
                    t.code, message = a.failure(exc)
                    return _error(t.code, message, retry_after(exc))

        endpoint.__annotations__ = {"request": Request}  # a real class: FastAPI injects the raw request
        return endpoint

    for op in oip.OPERATIONS:
        api.add_api_route(f"/v1/{op}", route(op), methods=["POST"], name=op, openapi_extra=_openapi_body(op),
                          summary=oip.OPERATIONS[op][3])

    @api.get("/v1/info", summary="The model and the serving path")
    async def info():
        return state["app"].info()

    @api.get("/v1/map", summary="2-D map (PCA of posterior means) of the model's test items, with labels")
    async def latent_map():
        a = state["app"]
        return await a.batcher.call(a.latent_map)


def _v2_routes(api, state: dict[str, App]) -> None:
    """The Open Inference Protocol (KServe v2) over REST, with the binary tensor data extension. Inference requests
    normally reach `V2Infer` before the routing; the route here documents them (and answers the same)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    async def infer_v2(request: Request, name: str, version: str | None = None):
        status, body, headers = await state["app"].infer_rest(name, version, request.headers, request.stream())
        return Response(body, status_code=status, headers=dict(headers))

    infer_v2.__annotations__ = {"request": Request, "name": str, "version": str | None}  # real classes, as above

    def v2_model(name: str, version: str | None = None) -> oip.ModelSpec | JSONResponse:
        try:
            return state["app"].model(name, version)
        except RequestError as exc:
            return _error(exc.status, exc.message)

    v2 = {"tags": ["Open Inference Protocol (KServe v2)"]}

    @api.get("/v2", summary="Server metadata: name, version, protocol extensions", **v2)
    async def v2_server():
        return state["app"].server_metadata()

    @api.get("/v2/health/live", summary="The process is alive", **v2)
    async def v2_live():
        return {"live": True}

    @api.get("/v2/health/ready", summary="The models are loaded and the server takes requests", **v2)
    async def v2_ready():
        return {"ready": True} if "app" in state else _error(503, "loading")

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


def _service_routes(api, state: dict[str, App]) -> None:
    """Health (/healthz, /readyz), Prometheus /metrics, the browser page at /, and 404/405 as JSON errors."""
    from fastapi.responses import FileResponse, Response

    @api.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @api.get("/readyz", summary="The model is loaded and the server takes requests")
    async def readyz():
        return {"status": "ready", "path": state["app"].path} if "app" in state else _error(503, "loading")

    @api.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(state["app"].metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    @api.exception_handler(404)
    async def not_found(request, exc):
        return _error(404, f"no route {request.url.path}; see /docs")

    @api.exception_handler(405)
    async def not_allowed(request, exc):
        return _error(405, f"{request.method} is not allowed on {request.url.path}; see /docs")


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
    gRPC port, shared by SO_REUSEPORT, when `grpc_port` is given); without `threads`, each engine takes its share
    of the cores (cores // workers, at least one)."""
    import os

    import uvicorn

    from . import http

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
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                    **http.uvicorn_options())
        return
    modeldir.model_config(modeldir.resolve_model_dir(model_dir))  # a bad folder fails here, once
    if kwargs.get("threads") is None:  # the cores shared out, not every worker's engine on all of them
        kwargs["threads"] = max(1, hardware.available_cpus() // workers)
    if on_ready:
        on_ready()
    os.environ[SERVE_ENV] = json.dumps({"model_dir": str(modeldir.resolve_model_dir(model_dir)),
                                        "limits": limits.__dict__, "grpc": grpc, **kwargs})
    import shutil
    import tempfile

    from .batcher import MULTIPROC_ENV

    metrics_dir = tempfile.mkdtemp(prefix="vae-engine-metrics-")  # the workers' metrics, summed by /metrics
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        uvicorn.run("vae_engine.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", timeout_graceful_shutdown=30, **http.uvicorn_options())
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
