"""`vae-engine serve`: endpoint parity with the offline jobs, micro-batching (merged and still identical answers),
4xx for each kind of bad request, limits, metrics, OpenAPI, and the page in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vae_engine import data
from vae_engine.jobs import batch as jobs  # noqa: E402
from vae_engine.runtime.engine import Engine  # noqa: E402
from vae_engine.serving.oip import RequestError  # noqa: E402
from vae_engine.serving.server import Limits, create_app  # noqa: E402

from .conftest import chromium, chromium_page, one_line_error, start_serve  # noqa: E402

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def model(exported_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "m"
    shutil.copytree(exported_model, out)
    return out


@pytest.fixture(scope="module")
def x(tiny_data):
    images, _ = data.load_split(tiny_data, "test")
    return images[:12].reshape(12, -1)  # uint8, as a user would send


@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, backend="onnxruntime", precision="fp32", threads=2, max_batch=64, max_wait_ms=5,
                     limits=Limits(max_body_bytes=1 << 20, max_items=100, max_k=500, timeout_s=20))
    with TestClient(app) as c:
        yield c


def _post(client, op, **body):
    r = client.post(f"/v1/{op}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _job(model, job, items, **params):
    """The offline batch job's answer on the same items (as a file), same seed."""
    engine = Engine.load(model, backend="onnxruntime", precision="fp32", threads=2)
    fn = jobs.make_job_fn(job, engine, params)
    return fn(0, items if job in ("decode", "sample") else data.model_input(items, True))


def test_endpoints_equal_the_offline_jobs(client, model, x):
    items = (x / 255).tolist()  # JSON numbers are values as they are; uint8 intensities travel as .npy
    np.testing.assert_allclose(_post(client, "reconstruct", items=items)["items"], _job(model, "reconstruct", x),
                               atol=1e-6)
    enc = _post(client, "encode", items=items)
    np.testing.assert_allclose(enc["mu"], _job(model, "encode", x), atol=1e-6)
    z = np.asarray(enc["mu"], np.float32)
    np.testing.assert_allclose(_post(client, "decode", z=z.tolist())["items"], _job(model, "decode", z), atol=1e-6)
    np.testing.assert_allclose(_post(client, "sample", n=5, seed=3)["items"],
                               _job(model, "sample", np.zeros((5, 0), np.float32), seed=3), atol=1e-6)
    for k in (1, 8):
        got = _post(client, "score", items=items, k=k, seed=2)["scores"]
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, _job(model, "score", x, k=k, seed=2, binarize=True), rtol=1e-5)


def test_npy_bodies_and_answers(client, x):
    buf = io.BytesIO()
    np.save(buf, x)
    r = client.post("/v1/score?k=4&seed=1", content=buf.getvalue(), headers={"content-type": NPY, "accept": NPY})
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    npy = np.load(io.BytesIO(r.content))
    assert npy.shape == (12,)
    np.testing.assert_allclose(npy, _post(client, "score", items=(x / 255).tolist(), k=4, seed=1)["scores"],
                               rtol=1e-6)


@pytest.mark.parametrize(("op", "body", "status", "fragment"), [
    ("score", {"items": [[0.5, 0.5]]}, 422, "shape"),
    ("score", {"items": "cat"}, 422, "list"),
    ("score", {"items": [[1, 2], [3]]}, 422, "rectangular"),
    ("score", {"items": [[0.1] * 784], "k": 10**6}, 422, "k must be"),
    ("score", {"items": [[0.1] * 784], "k": "many"}, 422, "k must be"),
    ("score", {"items": [[0.1] * 784], "seed": -1}, 422, "seed"),
    ("sample", {"n": 0}, 422, "n must be"),
    ("sample", {"n": 101}, 422, "n must be"),
    ("decode", {"z": [[0.0] * 3]}, 422, "z must be"),
    ("encode", {"items": [[0.1] * 784] * 101}, 413, "limit"),
    ("detect", {"items": [[0.1] * 784]}, 404, "detector"),
])
def test_bad_requests_get_one_line_4xx(client, op, body, status, fragment):
    r = client.post(f"/v1/{op}", content=json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert fragment in msg and "\n" not in msg


def test_malformed_bodies_and_limits(client):
    def post(content, ctype="application/json"):
        return client.post("/v1/score", content=content, headers={"content-type": ctype})

    assert post(b"{not json").status_code == 400
    assert post(b"[1, 2]").status_code == 422
    assert post(b"abc", "text/plain").status_code == 415
    assert post(b"\x93NUMPY garbage", NPY).status_code == 400
    buf = io.BytesIO()
    np.save(buf, np.full((2, 784), np.nan, np.float32))
    r = post(buf.getvalue(), NPY)
    assert r.status_code == 422 and "NaN" in r.json()["error"]
    assert post(b'{"items": [[NaN]]}').status_code in (400, 422)  # not JSON (orjson) or NaN values (json)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert post(buf.getvalue(), NPY).status_code == 400  # pickled arrays are refused
    assert post(b"[" + b"0," * (1 << 20) + b"0]").status_code == 413
    assert client.get("/v1/score").status_code == 405
    assert client.get("/nowhere").json()["error"].startswith("no route")


def test_health_metrics_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    spec = client.get("/openapi.json").json()
    ops = ("encode", "decode", "reconstruct", "sample", "score", "detect")
    assert {f"/v1/{op}" for op in ops} <= set(spec["paths"])
    assert NPY in spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert not spec["paths"]["/v1/score"]["post"].get("parameters")
    text = client.get("/metrics").text
    assert 'vae_requests_total{code="200",endpoint="score"}' in text and "vae_batch_items_bucket" in text
    assert "vae_queue_wait_seconds_bucket" in text and "vae_request_seconds_bucket" in text
    info = client.get("/v1/info").json()
    assert info["latent_dim"] == 4 and info["path"].startswith("onnxruntime/fp32")
    m = client.get("/v1/map").json()
    assert len(m["xy"]) == len(m["labels"]) and len(m["mean"]) == 4


# ---- a real server process: batching under concurrency, the browser page ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model):
    proc, url = start_serve([str(model), "--max-batch", "64", "--max-wait-ms", "20", "--threads", "2",
                             "--precision", "fp32"])
    yield url
    proc.terminate()
    assert proc.wait(30) == 0  # SIGTERM: graceful shutdown, exit 0


def test_concurrent_requests_are_merged_and_answers_unchanged(server, model, x):
    import httpx

    from vae_engine.serving.batcher import MicroBatcher

    k = MicroBatcher.INLINE_WORK + 36  # queued even when the server is idle, so overlapping requests merge

    def one(i):
        body = {"items": [(x[i % 12] / 255).tolist()], "k": k, "seed": 5, "start": i}
        r = httpx.post(f"{server}/v1/score", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["scores"][0]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(96)))
    # item i alone, as item `start` = i of a file: the same eps stream whatever batch it joined
    engine = Engine.load(model, backend="onnxruntime", precision="fp32", threads=2)
    xs = data.model_input(np.stack([x[i % 12] for i in range(96)]), True)
    want = jobs.make_job_fn("score", engine, {"k": k, "seed": 5, "binarize": True})(0, xs)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    text = httpx.get(f"{server}/metrics").text
    count = float(next(line.split()[1] for line in text.splitlines() if line.startswith("vae_batch_items_count")))
    total = float(next(line.split()[1] for line in text.splitlines() if line.startswith("vae_batch_items_sum")))
    assert total >= 96 and count < 96  # fewer engine calls than requests: requests were merged


@pytest.mark.skipif(chromium() is None or not os.environ.get("DISPLAY", "1"), reason="no chromium on this machine")
def test_page_renders_and_draws_in_chromium(server, tmp_path):
    pytest.importorskip("playwright.sync_api")
    with chromium_page() as (page, errors):
        page.goto(server + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert "latent 4" in page.inner_text("#info")
        before = int(page.get_attribute("body", "data-updates") or 0)
        box = page.locator("#draw").bounding_box()
        page.mouse.move(box["x"] + 100, box["y"] + 60)
        page.mouse.down()
        for step in range(20):
            page.mouse.move(box["x"] + 100 + step * 4, box["y"] + 60 + step * 8)
        page.mouse.up()
        page.wait_for_function(f"Number(document.body.dataset.updates) > {before}", timeout=10000)
        assert float(page.inner_text("#score")) > 0
        # the reconstruction canvas is not blank
        ink = page.evaluate("""() => { const c = document.getElementById('recon').getContext('2d');
            const d = c.getImageData(0, 0, 280, 280).data; let s = 0;
            for (let i = 0; i < d.length; i += 4) s += 255 - d[i]; return s; }""")
        assert ink > 0
        page.locator("#map").click(position={"x": 160, "y": 160})
        page.fill("#seed", "7")
        page.click("#resample")
        page.screenshot(path=str(tmp_path / "page.png"))
    assert not errors, errors


def _answers_like_one(url: str, items: list, want: list, requests: int, concurrency: int) -> None:
    """A scaled-out server (replicas, workers) answers `requests` score calls as the local app does (`want`), and a
    bad request with one 422 line."""
    import httpx

    def one(_):
        return httpx.post(f"{url}/v1/score", json={"items": items, "k": 4, "seed": 1}, timeout=60)

    with ThreadPoolExecutor(concurrency) as pool:
        for r in pool.map(one, range(requests)):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["scores"], want, rtol=1e-6)
    bad = httpx.post(f"{url}/v1/score", json={"items": [[0.5]]}, timeout=60)
    assert bad.status_code == 422 and "shape" in bad.json()["error"]


@pytest.mark.slow
def test_ray_serve_answers_like_the_local_server(client, model, x):
    """`serve --ray`: the same app on Ray Serve with one, then two replicas, answers as the local server does."""
    pytest.importorskip("ray.serve")
    from ray import serve

    from vae_engine.serving import ray_serve

    port = _free_port()
    items = (x / 255).tolist()
    want = _post(client, "score", items=items, k=4, seed=1)["scores"]
    try:
        for replicas in (1, 2):
            ray_serve.start(model, port=port, replicas=replicas, backend="onnxruntime", precision="fp32", threads=1)
            _answers_like_one(f"http://127.0.0.1:{port}", items, want, requests=4, concurrency=1)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def test_cli_serve_bad_settings_are_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from vae_engine.cli import app

    runner = CliRunner()
    bad_json = tmp_path / "m"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{")
    for args, fragment in ((["serve", str(tmp_path / "nope")], "not found"), (["serve", str(bad_json)], "JSON"),
                           (["serve", "--max-batch", "0"], "--max-batch"), (["serve", "--max-wait-ms", "-1"], "wait")):
        one_line_error(runner.invoke(app, args), fragment)


def test_request_timeout_is_504(model, x):
    app = create_app(model, backend="onnxruntime", precision="fp32", threads=2,
                     limits=Limits(timeout_s=1e-6, max_work=10**9))  # admitted; no engine call answers this fast
    with TestClient(app) as c:
        r = c.post("/v1/score", json={"items": (x / 255).tolist(), "k": 500})
        assert r.status_code == 504 and "no answer within" in r.json()["error"]
        assert c.get("/healthz").status_code == 200  # the server goes on


def test_workers_share_the_cores_unless_threads_are_given(model, monkeypatch):
    """`serve --workers N` without --threads gives each worker's engine cores // N threads (not all of them each)."""
    import uvicorn

    from vae_engine.core import hardware
    from vae_engine.serving import server as srv

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.append(json.loads(os.environ[srv.SERVE_ENV])))
    monkeypatch.setattr(hardware, "available_cpus", lambda: 8)
    monkeypatch.delenv(srv.SERVE_ENV, raising=False)
    srv.serve(model, workers=3, backend="onnxruntime", precision="fp32")
    srv.serve(model, workers=16, backend="onnxruntime", precision="fp32")
    srv.serve(model, workers=2, backend="onnxruntime", precision="fp32", threads=3)
    assert [s["threads"] for s in seen] == [2, 1, 3]


@pytest.mark.slow  # two worker processes each load the model (~20 s)
def test_two_workers_answer_like_one(client, model, x):
    """`serve --workers 2`: two processes on one port, each answering as the in-process app does."""

    items = (x / 255).tolist()
    want = _post(client, "score", items=items, k=4, seed=1)["scores"]
    proc, url = start_serve([str(model), "--workers", "2", "--backend", "onnxruntime", "--precision", "fp32"])
    try:
        _answers_like_one(url, items, want, requests=16, concurrency=8)  # concurrent: both workers answer some
        import httpx

        for _ in range(6):  # whichever worker answers the scrape reports both workers' counts (multiprocess mode)
            text = httpx.get(f"{url}/metrics", timeout=30).text
            assert 'vae_requests_total{code="200",endpoint="score"} 16.0' in text, text[-2000:]
            assert 'vae_requests_total{code="422",endpoint="score"} 1.0' in text
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


# ---- work: admission, slices, cancellation (issue 38) ----


def _score_app(model, monkeypatch, slice_rows=64, **limits):
    app = create_app(model, backend="onnxruntime", precision="fp32", threads=2, max_batch=64, max_wait_ms=1,
                     limits=Limits(max_items=100, max_k=5000, timeout_s=30, **limits))
    a = app.state.load()
    a.slice_rows = slice_rows  # tiny model, tiny slices: many of them
    return app


def test_work_past_the_limit_is_a_413_that_says_what_to_send(model, x, monkeypatch):
    with TestClient(_score_app(model, monkeypatch, max_work=1000)) as c:
        r = c.post("/v1/score", json={"items": (x[:5] / 255).tolist(), "k": 300})  # 1,500 rows
        assert r.status_code == 413 and "1,500 decoder rows" in r.json()["error"] and "batch job" in r.json()["error"]
        assert c.post("/v1/score", json={"items": (x[:5] / 255).tolist(), "k": 200}).status_code == 200
        assert 'vae_refused_total{reason="work"} 1.0' in c.get("/metrics").text


@pytest.mark.parametrize("k", [1, 7, 300])
def test_long_requests_run_in_slices_with_the_unsliced_answer(model, x, monkeypatch, k):
    """Slices of 64 decoder rows (items, and for k > 64 the samples of each item) answer what the batch job
    answers in one call (partial log-sums of the importance weights combined in float64)."""
    items = x[:12]
    calls = []
    app = _score_app(model, monkeypatch)
    with TestClient(app) as c:
        a = app.state.load()
        real = a._slice
        monkeypatch.setattr(a, "_slice", lambda *args: calls.append(args[2:]) or real(*args))
        got = _post(c, "score", items=(items / 255).tolist(), k=k, seed=3, start=5)["scores"]
    engine = Engine.load(model, backend="onnxruntime", precision="fp32", threads=2)
    want = jobs.make_job_fn("score", engine, {"k": k, "seed": 3})(5, data.model_input(items, True))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(calls) == (0 if k * 12 <= 64 else -(-12 // max(1, 64 // k)) * -(-k // min(k, 64)))  # 0: one call


def test_a_request_past_its_deadline_frees_the_engine_at_the_next_slice(model, x, monkeypatch):
    app = _score_app(model, monkeypatch)
    with TestClient(app) as c:
        a = app.state.load()
        slices = []
        real = a._slice

        def slow(*args):  # each slice takes 50 ms: 150 slices would take 7.5 s
            import time

            time.sleep(0.05)
            slices.append(1)
            return real(*args)

        monkeypatch.setattr(a, "_slice", slow)
        a.limits = Limits(max_items=100, max_k=5000, timeout_s=0.3)
        r = c.post("/v1/score", json={"items": (x[:10] / 255).tolist(), "k": 960})  # 9,600 rows: 150 slices
        assert r.status_code == 504
        assert len(slices) <= 0.3 / 0.05 + 2  # stopped at the slice after the deadline, not run to the end
        assert a.sliced == {"requests": 0, "rows": 0}
        assert 'vae_cancelled_total{reason="deadline"} 1.0' in c.get("/metrics").text


def test_a_client_that_goes_away_frees_the_engine_at_the_next_slice(model, x, monkeypatch):
    import asyncio

    app = _score_app(model, monkeypatch)
    with TestClient(app):
        a = app.state.load()
        key, payload, n = a.prepare("score", (x[:10] / 255).astype(np.float32), {"k": 640})
        seen = []

        def cancelled():  # the client leaves after the third slice
            seen.append(1)
            return len(seen) > 3

        async def ask():
            return await a.answer(key, payload, n, cancelled=cancelled)

        with pytest.raises(Exception) as info:
            asyncio.run(ask())
        assert getattr(info.value, "status", None) == 499 and len(seen) == 4  # 3 slices ran, then it stopped
        assert a.sliced == {"requests": 0, "rows": 0}


def test_small_requests_are_answered_while_a_long_one_runs(model, x, monkeypatch):
    """One engine thread, slice by slice: one-item encodes sent while a long score runs are all answered
    before it ends (they wait for one slice, not for the whole request)."""
    import threading
    import time

    app = _score_app(model, monkeypatch)
    with TestClient(app) as c:
        a = app.state.load()
        real = a._slice
        monkeypatch.setattr(a, "_slice", lambda *args: (time.sleep(0.01), real(*args))[1])
        done = {}

        def long():
            r = c.post("/v1/score", json={"items": (x[:10] / 255).tolist(), "k": 640})  # 100 slices, >= 1 s
            done["long"] = (time.perf_counter(), r.status_code)

        t = threading.Thread(target=long)
        t.start()
        while not a.sliced["requests"]:
            time.sleep(0.005)
        small = []
        for i in range(10):
            r = c.post("/v1/encode", json={"items": (x[i:i + 1] / 255).tolist()})
            small.append((time.perf_counter(), r.status_code))
        t.join()
    assert done["long"][1] == 200 and all(code == 200 for _, code in small)
    assert max(when for when, _ in small) < done["long"][0]


def test_a_long_request_that_cannot_end_in_time_beside_others_is_a_503_with_retry_after(model, x, monkeypatch):
    """Beside the long requests running (which share the engine thread slice by slice), a long request that could
    not end within the timeout is refused at once, with when to retry; small ones are always admitted."""
    app = _score_app(model, monkeypatch, max_work=10**6)
    with TestClient(app) as c:
        a = app.state.load()
        a.rows_per_s = 2000.0  # as if the decoder ran 2,000 rows/s: a scored row 1 ms
        a.admit(20_000)  # alone: 20 s of the 30 s timeout, admitted
        a.sliced.update(requests=1, rows=9_000)  # one long request running, 9,000 rows left (~9 s)
        a.admit(10_000)  # beside it: 10,000 rows x 2 shares = 20 s, admitted
        a.admit(64)  # small requests never wait for the long ones
        with pytest.raises(RequestError) as info:
            a.admit(20_000)  # 40 s beside it: refused now rather than timed out later
        assert info.value.status == 503 and info.value.retry_after == 9 and "retry in 9 s" in info.value.message
        a.sliced.update(requests=0, rows=0)
        assert 'vae_refused_total{reason="busy"} 1.0' in c.get("/metrics").text


def test_the_clients_own_deadline_bounds_a_sliced_request(model, x, monkeypatch):
    """A gRPC client's deadline (`time_left`) ends a long request at its first slice past it, as the server's
    timeout does."""
    import asyncio

    app = _score_app(model, monkeypatch)
    with TestClient(app) as c:
        a = app.state.load()
        key, payload, n = a.prepare("score", (x[:10] / 255).astype(np.float32), {"k": 640})
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(a.answer(key, payload, n, time_left=0.0))
        assert a.sliced == {"requests": 0, "rows": 0}
        assert 'vae_cancelled_total{reason="deadline"} 1.0' in c.get("/metrics").text
