"""The Open Inference Protocol (KServe v2) of `vae-engine serve`, driven by NVIDIA's `tritonclient` (a client
vae-engine did not write) over REST (JSON and binary tensors) and gRPC, and by raw requests for what a well-behaved
client never sends: answers equal the offline jobs' and /v1's, every bad request is one 4xx line."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from vae_engine import data  # noqa: E402
from vae_engine.jobs import batch as jobs  # noqa: E402
from vae_engine.runtime.engine import Engine  # noqa: E402
from vae_engine.serving import oip  # noqa: E402

from .conftest import one_line_error, start_serve  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(exported_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_v2") / "tiny"  # served as tiny-encode, tiny-score, ...
    shutil.copytree(exported_model, out)
    return out


@pytest.fixture(scope="module")
def x(tiny_data):
    images, _ = data.load_split(tiny_data, "test")
    return images[:10].reshape(10, -1)


@pytest.fixture(scope="module")
def server(model):
    grpc_port = _free_port()
    proc, url = start_serve([str(model), "--grpc-port", str(grpc_port), "--max-batch", "64", "--max-wait-ms", "20",
                             "--threads", "2", "--precision", "fp32", "--backend", "onnxruntime", "--max-items",
                             "100", "--max-body-mb", "1"], ready_path="/v2/health/ready")
    http_port = url.rsplit(":", 1)[1]
    yield {"url": url, "http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    proc.terminate()
    assert proc.wait(30) == 0  # SIGTERM: both protocols stop, queued work is answered, exit 0


@pytest.fixture(scope="module")
def clients(server):
    return {"http": httpclient.InferenceServerClient(server["http"]),
            "grpc": grpcclient.InferenceServerClient(server["grpc"])}


def _job(model, job, items, **params):
    engine = Engine.load(model, backend="onnxruntime", precision="fp32", threads=2)
    return jobs.make_job_fn(job, engine, params)(0, items if job in ("decode", "sample") else
                                                 data.model_input(items, True))


def _infer(clients, kind, model_name, inputs: dict, outputs=None, binary=True, **parameters):
    """One tritonclient infer call; kind: http (binary or JSON tensors) or grpc -> {output: array}."""
    lib = grpcclient if kind == "grpc" else httpclient
    tensors = []
    for name, a in inputs.items():
        t = lib.InferInput(name, list(a.shape), oip.DATATYPE_OF[a.dtype])
        t.set_data_from_numpy(a) if kind == "grpc" else t.set_data_from_numpy(a, binary_data=binary)
        tensors.append(t)
    outs = None
    if outputs:
        outs = [grpcclient.InferRequestedOutput(o) if kind == "grpc" else
                httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    r = clients[kind].infer(model_name, tensors, outputs=outs, parameters=parameters or None)
    names = outputs or [o["name"] for o in (r.get_response()["outputs"] if kind == "http" else
                                            r.get_response(as_json=True)["outputs"])]
    return {n: r.as_numpy(n) for n in names}


def test_health_and_metadata_through_tritonclient(clients, model):
    from vae_engine import modeldir

    cfg = modeldir.model_config(model)
    for kind, c in clients.items():
        assert c.is_server_live() and c.is_server_ready()
        meta = c.get_server_metadata()
        meta = meta if kind == "http" else {"extensions": list(meta.extensions), "name": meta.name}
        assert meta["name"] == "vae-engine" and "binary_tensor_data" in meta["extensions"]
        for op in ("encode", "decode", "reconstruct", "sample", "score"):
            assert c.is_model_ready(f"tiny-{op}")
        m = c.get_model_metadata("tiny-encode")
        m = m if kind == "http" else json.loads(__import__("google.protobuf.json_format", fromlist=["x"])
                                                .MessageToJson(m))
        assert m["inputs"][0]["name"] == "items" and m["inputs"][0]["datatype"] == "FP32"
        assert [int(d) for d in m["inputs"][0]["shape"]] == [-1, *cfg.input_shape]
        assert [o["name"] for o in m["outputs"]] == ["mu", "logvar"]
        with pytest.raises(InferenceServerException, match="no model 'tiny-nope'"):
            c.get_model_metadata("tiny-nope")
        assert not _ready_or_false(c, "tiny-detect")  # no detector.json in this folder: no such model
    index = clients["http"].get_model_repository_index()
    assert {m["name"] for m in index} == {f"tiny-{op}" for op in ("encode", "decode", "reconstruct", "sample",
                                                                  "score")}
    assert all(m["state"] == "READY" for m in index)
    config = clients["http"].get_model_config("tiny-score")
    assert config["max_batch_size"] == 64 and config["input"][0]["data_type"] == "TYPE_FP32"


def _ready_or_false(c, name) -> bool:
    try:
        return c.is_model_ready(name)
    except InferenceServerException:
        return False


@pytest.mark.parametrize("kind,binary", [("http", True), ("http", False), ("grpc", True)])
def test_infer_equals_the_offline_jobs(clients, model, x, kind, binary):
    f = (x / 255).astype(np.float32)

    def call(op, inputs, **kw):
        return _infer(clients, kind, f"tiny-{op}", inputs, binary=binary, **kw)

    enc = call("encode", {"items": f})
    np.testing.assert_allclose(enc["mu"], _job(model, "encode", x), atol=1e-6)
    assert enc["mu"].dtype == np.float32 and enc["logvar"].shape == enc["mu"].shape
    np.testing.assert_allclose(call("encode", {"items": x.astype(np.uint8)})["mu"], enc["mu"], atol=1e-6)  # 0..255
    np.testing.assert_allclose(call("reconstruct", {"items": f})["reconstruction"], _job(model, "reconstruct", x),
                               atol=1e-6)
    z = enc["mu"]
    np.testing.assert_allclose(call("decode", {"z": z})["items"], _job(model, "decode", z), atol=1e-6)
    np.testing.assert_allclose(call("sample", {"n": np.array([5], np.int64)}, seed=3)["items"],
                               _job(model, "sample", np.zeros((5, 0), np.float32), seed=3), atol=1e-6)
    for k in (1, 8):
        got = call("score", {"items": f}, k=k, seed=2, start=0)["scores"]
        assert got.dtype == np.float64 and got.shape == (len(x),)
        np.testing.assert_allclose(got, _job(model, "score", x, k=k, seed=2, binarize=True), rtol=1e-5)
    # only the outputs asked for
    only = _infer(clients, kind, "tiny-encode", {"items": f}, outputs=["logvar"], binary=binary)
    assert list(only) == ["logvar"]


def test_rest_json_and_binary_responses_follow_the_request(server, x):
    import httpx

    f = (x[:2] / 255).astype(np.float32)
    body = {"id": "req-7", "inputs": [{"name": "items", "shape": [2, f.shape[1]], "datatype": "FP32",
                                       "data": f.tolist()}]}  # nested lists are taken too
    r = httpx.post(f"{server['url']}/v2/models/tiny-encode/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["id"] == "req-7" and out["model_name"] == "tiny-encode" and out["model_version"] == "1"
    assert [o["name"] for o in out["outputs"]] == ["mu", "logvar"] and len(out["outputs"][0]["data"]) == 2 * 4
    body["parameters"] = {"binary_data_output": True}
    r = httpx.post(f"{server['url']}/v2/models/tiny-encode/versions/1/infer", json=body)
    n = int(r.headers[oip.HEADER])
    head = json.loads(r.content[:n])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [2 * 4 * 4, 2 * 4 * 4] and len(r.content) == n + sum(sizes)
    mu = np.frombuffer(r.content[n:n + sizes[0]], "<f4").reshape(2, 4)
    np.testing.assert_allclose(mu, np.asarray(out["outputs"][0]["data"], np.float32).reshape(2, 4))


def test_concurrent_single_items_are_batched_and_unchanged(server, clients, model, x):
    import httpx

    from vae_engine.serving.batcher import MicroBatcher

    f, K = (x / 255).astype(np.float32), MicroBatcher.INLINE_WORK + 36

    def one(i):
        c = httpclient.InferenceServerClient(server["http"])
        t = httpclient.InferInput("items", [1, f.shape[1]], "FP32")
        t.set_data_from_numpy(f[i % 10][None], binary_data=True)
        # k above the batcher's INLINE_WORK: a request that finds the server idle is still queued, so requests
        # that overlap are merged (a lone small one would be answered on the event loop, and with a fast server
        # the clients' own pace decides whether any two ever overlap)
        return c.infer("tiny-score", [t], parameters={"k": K, "seed": 5, "start": i}).as_numpy("scores")[0]

    before = _metric(httpx.get(f"{server['url']}/metrics").text, "vae_batch_items_count")
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(one, range(72)))
    xs = np.stack([x[i % 10] for i in range(72)])
    np.testing.assert_allclose(got, _job(model, "score", xs, k=K, seed=5, binarize=True), rtol=1e-5)
    text = httpx.get(f"{server['url']}/metrics").text
    assert _metric(text, "vae_batch_items_count") - before < 72  # merged into fewer engine calls
    assert 'vae_requests_total{code="200",endpoint="v2/score"}' in text


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name)))


def test_grpc_and_rest_agree_on_a_batch(clients, x):
    f = (x / 255).astype(np.float32)
    a = _infer(clients, "grpc", "tiny-score", {"items": f}, k=3, seed=9)["scores"]
    b = _infer(clients, "http", "tiny-score", {"items": f}, k=3, seed=9)["scores"]
    np.testing.assert_array_equal(a, b)


def test_compressed_requests(clients, x):
    f = (x / 255).astype(np.float32)
    t = httpclient.InferInput("items", list(f.shape), "FP32")
    t.set_data_from_numpy(f, binary_data=True)
    plain = clients["http"].infer("tiny-score", [t]).as_numpy("scores")
    for algorithm in ("gzip", "deflate"):
        got = clients["http"].infer("tiny-score", [t], request_compression_algorithm=algorithm).as_numpy("scores")
        np.testing.assert_array_equal(got, plain)


def _v2(server, model_name, body: bytes | dict, headers=None):
    import httpx

    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(f"{server['url']}/v2/models/{model_name}/infer", content=content, headers=headers or {})


def _items(d=784, n=1, **extra):
    return {"inputs": [{"name": "items", "shape": [n, d], "datatype": "FP32", "data": [0.5] * (n * d)}], **extra}


BAD = [  # (model, body, headers, status, fragment)
    ("tiny-score", b"{nope", None, 400, "not valid JSON"),
    ("tiny-score", b"[1, 2]", None, 400, "JSON object"),
    ("tiny-score", {"inputs": []}, None, 400, "non-empty 'inputs'"),
    ("tiny-score", _items(d=3), None, 422, "must have shape"),
    ("tiny-score", {"inputs": [{"name": "items", "shape": [1, 784], "datatype": "BYTES", "data": ["a"]}]}, None,
     400, "datatype 'BYTES'"),
    ("tiny-decode", {"inputs": [{"name": "z", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}]}, None,
     400, "send FP16 or FP32 or FP64"),
    ("tiny-score", {"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 783}]},
     None, 400, "783 values"),
    ("tiny-score", {"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP32",
                                "data": [0.5] * 783 + ["x"]}]}, None, 400, "list of FP32 numbers"),
    ("tiny-score", {"inputs": [{"name": "items", "shape": [1, -784], "datatype": "FP32", "data": []}]}, None, 400,
     "non-negative"),
    ("tiny-score", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]},
     None, 400, "takes input items; unknown input 'pixels'"),
    ("tiny-score", _items(parameters={"K": 5}), None, 400, "unknown parameter 'K'"),
    ("tiny-score", _items(parameters={"k": 0}), None, 422, "k must be between 1 and 5,000, got 0"),
    ("tiny-score", _items(parameters={"k": "many"}), None, 422, "k must be an integer"),
    ("tiny-score", _items(parameters={"seed": -1}), None, 422, "seed must be"),
    ("tiny-score", _items(outputs=[{"name": "nll"}]), None, 400, "unknown output 'nll'"),
    ("tiny-score", _items(n=101), None, 413, "the limit is 100"),
    ("tiny-encode", {"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP64",
                                 "data": [float("nan")] + [0.5] * 783}]}, None, 400, "not valid JSON"),  # NaN
    ("tiny-encode", {"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP32", "data": [2.0] * 784}]},
     None, 422, "[0, 1]"),
    ("tiny-sample", {"inputs": [{"name": "n", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}, None, 400,
     "one integer"),
    ("tiny-sample", {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [0]}]}, None, 422,
     "n must be"),
    ("tiny-sample", {"inputs": [{"name": "n", "shape": [1], "datatype": "UINT8", "data": [300]}]}, None, 400,
     "range of UINT8"),
    ("tiny-score", {"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784,
                                "parameters": {"binary_data_size": 3136}}]}, None, 400, "both 'data' and"),
    ("tiny-nope", _items(), None, 404, "no model 'tiny-nope'"),
    ("tiny-detect", _items(), None, 404, "no model 'tiny-detect'"),
]


@pytest.mark.parametrize("name,body,headers,status,fragment", BAD, ids=[f"{b[0]}-{b[4][:20]}" for b in BAD])
def test_bad_rest_requests_are_one_line_4xx(server, name, body, headers, status, fragment):
    r = _v2(server, name, body, headers)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    message = r.json()["error"]
    assert fragment in message and "\n" not in message and "Traceback" not in message, message


def test_bad_binary_bodies(server):
    raw = np.full((1, 784), 0.5, np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    ok = {oip.HEADER: str(len(head)), "content-type": "application/octet-stream"}
    assert _v2(server, "tiny-score", head + raw, ok).status_code == 200
    for body, headers, fragment in (
            (head + raw[:-4], ok, "binary bytes left"),  # cut short
            (head + raw + b"xx", ok, "2 bytes after the last binary input"),
            (head + raw, {**ok, oip.HEADER: "99999"}, "not a length within"),
            (head + raw, {**ok, oip.HEADER: "-3"}, "not a length within"),
            (head.replace(b'"shape": [1, 784]', b'"shape": [1, 783]') + raw, ok, "bytes for shape [1, 783]"),
            (head + raw, {**ok, "content-encoding": "gzip"}, "not valid gzip"),
            (head + raw, {**ok, "content-encoding": "br"}, "Content-Encoding 'br'")):
        r = _v2(server, "tiny-score", body, headers)
        assert 400 <= r.status_code < 500 and fragment in r.json()["error"], (fragment, r.text)
    nan = np.full((1, 784), np.nan, np.float32).tobytes()
    r = _v2(server, "tiny-score", head + nan, ok)
    assert r.status_code == 422 and "NaN" in r.json()["error"]
    bomb = gzip.compress(b"\0" * (3 << 20))  # inflates past --max-body-mb 1
    r = _v2(server, "tiny-score", bomb, {"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflated" in r.json()["error"]


def test_bad_grpc_requests_get_status_codes(clients, server):
    import grpc

    f = np.full((1, 784), 0.5, np.float32)
    for model_name, inputs, params, code, fragment in (
            ("tiny-nope", {"items": f}, {}, grpc.StatusCode.NOT_FOUND, "no model"),
            ("tiny-score", {"items": f[:, :3]}, {}, grpc.StatusCode.INVALID_ARGUMENT, "must have shape"),
            ("tiny-score", {"items": f}, {"k": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
            ("tiny-score", {"items": f}, {"bogus": 1}, grpc.StatusCode.INVALID_ARGUMENT, "unknown parameter")):
        with pytest.raises(InferenceServerException) as info:
            _infer(clients, "grpc", model_name, inputs, **params)
        assert str(code) in info.value.status() and fragment in info.value.message()
    # a raw input whose size does not match its shape, and typed contents instead of raw
    from vae_engine.serving import oip_grpc

    msg = oip_grpc._messages()
    channel = grpc.insecure_channel(server["grpc"])
    infer = channel.unary_unary(f"/{oip_grpc.SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=msg["ModelInferResponse"].FromString)
    req = msg["ModelInferRequest"](model_name="tiny-score")
    req.inputs.add(name="items", datatype="FP32", shape=[1, 784])
    req.raw_input_contents.append(f.tobytes()[:-4])
    with pytest.raises(grpc.RpcError) as info:
        infer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "3132 bytes" in info.value.details()
    req = msg["ModelInferRequest"](model_name="tiny-score")
    t = req.inputs.add(name="items", datatype="FP32", shape=[1, 784])
    t.contents.fp32_contents.extend(f.ravel().tolist())
    out = infer(req)
    raw = _infer(clients, "grpc", "tiny-score", {"items": f})["scores"]
    np.testing.assert_array_equal(np.frombuffer(out.raw_output_contents[0], "<f8"), raw)
    channel.close()


def test_values_are_checked_against_their_datatype():
    with pytest.raises(oip.RequestError, match="range of INT8"):
        oip.from_values([1, 200], "n", "INT8", (2,))
    with pytest.raises(oip.RequestError, match="list of INT64"):
        oip.from_values([1.5], "n", "INT64", (1,))
    with pytest.raises(oip.RequestError, match="list of FP32"):
        oip.from_values([[1, 2], [3]], "x", "FP32", (2, 2))  # ragged
    np.testing.assert_array_equal(oip.from_values([[1, 2], [3, 4]], "x", "FP32", (4,)), [1, 2, 3, 4])
    a = oip.from_bytes(np.arange(6, dtype="<f2").tobytes(), "x", "FP16", (2, 3))
    assert a.dtype == np.float16 and a.shape == (2, 3) and a[1, 2] == 5


def test_grpc_messages_are_wire_compatible_with_triton(x):
    """Our descriptor-built messages and Triton's generated ones read each other's bytes."""
    from tritonclient.grpc import service_pb2

    from vae_engine.serving import oip_grpc

    ours = oip_grpc._messages()
    req = ours["ModelInferRequest"](model_name="m", id="7")
    req.parameters["k"].int64_param = 5
    req.parameters["binarize"].bool_param = False
    t = req.inputs.add(name="items", datatype="FP32", shape=[2, 3])
    t.contents.fp32_contents.extend([1, 2, 3, 4, 5, 6])
    req.outputs.add(name="scores")
    req.raw_input_contents.append(b"\1\2")
    theirs = service_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert theirs.model_name == "m" and theirs.parameters["k"].int64_param == 5
    assert not theirs.parameters["binarize"].bool_param and theirs.parameters["binarize"].HasField("bool_param")
    assert list(theirs.inputs[0].shape) == [2, 3] and list(theirs.inputs[0].contents.fp32_contents) == [1, 2, 3, 4,
                                                                                                         5, 6]
    assert theirs.outputs[0].name == "scores" and theirs.raw_input_contents[0] == b"\1\2"
    meta = service_pb2.ModelMetadataResponse(name="m", versions=["1"], platform="p")
    meta.inputs.add(name="items", datatype="FP32", shape=[-1, 784])
    back = ours["ModelMetadataResponse"].FromString(meta.SerializeToString())
    assert list(back.inputs[0].shape) == [-1, 784] and back.platform == "p"


def test_cli_grpc_settings_are_one_error_line(model):
    from typer.testing import CliRunner

    from vae_engine.cli import app

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, fragment in ((["--port", "8000", "--grpc-port", "8000"], "is the HTTP --port too"),
                               (["--grpc-port", "8001", "--ray"], "Ray Serve"),
                               (["--grpc-port", "0"], "--grpc-port"),
                               (["--port", str(_free_port()), "--grpc-port", str(busy.getsockname()[1])],
                                "cannot listen")):
            one_line_error(CliRunner().invoke(app, ["serve", str(model), *args]), fragment)
    finally:
        busy.close()


def _raw_http(url: str, request: bytes) -> bytes:
    """One request over a plain socket (no client library normalizes it), the whole answer back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_http_limits_refuse_long_request_lines_and_headers_and_stay_up(server):
    from vae_engine.serving import http

    server = server["url"]
    big = b"x-pad: " + b"a" * (http.MAX_HEADER_BYTES + 1) + b"\r\n"
    answer = _raw_http(server, b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n" + big + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"headers are over" in answer, answer[:300]
    many = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 1000) for i in range(20))  # 20 lines under any line limit
    assert _raw_http(server, b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\n" + many + b"\r\n").startswith(
        b"HTTP/1.1 431 ")
    target = b"/v2/health/ready?" + b"q" * (http.MAX_REQUEST_LINE + 1)
    assert _raw_http(server, b"GET " + target + b" HTTP/1.1\r\nhost: t\r\n\r\n").startswith(b"HTTP/1.1 414 ")
    ok = _raw_http(server, b"GET /v2/health/ready HTTP/1.1\r\nhost: t\r\nconnection: close\r\n"
                           + b"x-pad: " + b"a" * 4000 + b"\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:300]  # ordinary headers pass, and the server is up
