"""`vae-engine serve --ray`: the same FastAPI app deployed on Ray Serve, one engine and micro-batcher per replica.

Ray Serve routes each HTTP request to a replica; inside it the app batches concurrent requests exactly as the
uvicorn server does, so answers equal the local server's. Needs `pip install "ray[serve]"`.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import VaeEngineError


def _require_serve():
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise VaeEngineError(f'serve --ray needs Ray Serve ({exc.name} is missing): pip install "ray[serve]"') from None
    return ray, serve


def deployment(model_dir: Path, replicas: int = 1, cpus_per_replica: float = 1.0, limits=None, **settings):
    """A bound Ray Serve application of the app for `model_dir` with `replicas` replicas."""
    _, serve = _require_serve()
    from .server import create_app

    api = create_app(model_dir, limits=limits, **settings)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=1024)
    @serve.ingress(api)
    class VaeEngine:
        def __init__(self):
            api.state.load()  # the model, loaded once per replica

    return VaeEngine.bind()


def start(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, limits=None,
          address: str | None = None, **settings) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy; returns once the app is ready."""
    ray, serve = _require_serve()

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            from ..jobs.ray_jobs import init_local

            init_local(ray, replicas)
    serve.start(http_options={"host": host, "port": port})
    threads = settings.pop("threads", None) or 1
    serve.run(deployment(model_dir, replicas, float(threads), limits, threads=threads, **settings),
              name="vae-engine", route_prefix="/")


def run(model_dir: Path, host: str, port: int, replicas: int, limits=None, on_ready=None, **settings) -> None:
    """`serve --ray`: deploy, then block until Ctrl-C/SIGTERM, then shut Serve down (draining each replica)."""
    import time

    _, serve = _require_serve()
    start(model_dir, host, port, replicas, limits, **settings)
    if on_ready:
        on_ready()
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
