"""Load test of `vae-engine serve` with real load generators, batching on and off, /v1 and the v2 protocol, in one run.

One MNIST item per request, `score` (k=1) and `reconstruct`, at concurrency 1, 16 and 64, through
- /v1 with a JSON body (wrk),
- v2 REST (/v2/models/NAME-OP/infer) with the binary tensor data extension both ways (wrk),
- v2 REST with JSON tensors (wrk, score only),
- v2 gRPC (ModelInfer with raw_input_contents; h2load sends the gRPC frames over HTTP/2),
with micro-batching on (--max-batch 256 --max-wait-ms 2) and off (--max-batch 1), and /v1 and v2 binary `score`
again on a server of two worker processes (--workers 2): requests/s, p50/p99 latency and the server's CPU seconds
per request (from /proc, its worker processes included). Also: the round trip of an empty request (GET
/v2/health/live, gRPC ServerLive) and a direct in-process Engine call on the server's path, the two parts of the
concurrency-1 target; then a soak of mixed good and bad requests (both protocols) at concurrency 64: status codes
from the server's /metrics, the process alive, its memory before and after.

    python bench/load_test.py --seconds 8 --markdown load.md   # needs wrk, h2load (apt-get install wrk nghttp2-client)

Server and load generator share the machine: --server-threads (default 1) for the engine, one generator thread.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from vae_engine import data

LUA = """
local reqs = {%s}
local i = 0
request = function()
  i = i + 1
  local r = reqs[(i %% #reqs) + 1]
  return wrk.format(r[1], r[2], r[3], r[4])
end
"""


@dataclass
class Req:
    path: str
    body: bytes = b""
    headers: dict = field(default_factory=lambda: {"Content-Type": "application/json"})
    method: str = "POST"


def _lua(s: bytes | str) -> str:
    b = s.encode() if isinstance(s, str) else s
    return '"' + "".join(f"\\{c}" for c in b) + '"'  # decimal escapes: any bytes, binary bodies included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_wait_ms: float, threads: int,
                 workers: int = 1) -> tuple[subprocess.Popen, str, int]:
    port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vae_engine", "serve", model, "--port", str(port), "--max-batch",
                             str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads),
                             "--grpc-port", str(grpc_port), "--workers", str(workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url, grpc_port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, reqs: list[Req], connections: int, seconds: float) -> dict:
    """wrk with a Lua script cycling through the requests; requests/s and latency percentiles."""
    rows = ", ".join("{" + ", ".join([_lua(r.method), _lua(r.path), "{" + ", ".join(
        f"[{_lua(k)}] = {_lua(v)}" for k, v in r.headers.items()) + "}", _lua(r.body)]) + "}" for r in reqs)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA % rows)
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--latency", "-s", f.name,
           url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()
    lat = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)), "non_2xx": int(bad.group(1)) if bad else 0}


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message  # uncompressed, length-prefixed


def h2load(port: int, method: str, frames: bytes, connections: int, seconds: float) -> dict:
    """h2load: gRPC unary calls (HTTP/2 POSTs of one frame) on `connections` connections, one stream each."""
    with tempfile.TemporaryDirectory() as tmp:
        body, log = Path(tmp, "body"), Path(tmp, "log")
        body.write_bytes(frames)
        cmd = ["h2load", "-t", "1", "-c", str(connections), "-m", "1", "-D", str(max(1, round(seconds))),
               "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
               f"http://127.0.0.1:{port}/inference.GRPCInferenceService/{method}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    lat = np.array([int(r[2]) for r in rows]) / 1000  # start (us), status, duration (us)
    ok = sum(1 for r in rows if r[1].startswith("2"))
    took = float(re.search(r"finished in ([\d.]+)(\w+)", out).group(1)) * (
        {"s": 1, "ms": 1e-3}[re.search(r"finished in [\d.]+(\w+)", out).group(1)])
    return {"requests_per_s": len(rows) / took, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(rows), "non_2xx": len(rows) - ok}


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children (uvicorn's worker processes)."""
    import os

    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def metric(url: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def v2_binary(x: np.ndarray, output: str, parameters: dict | None = None) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": "items", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": output, "parameters": {"binary_data": True}}]}
    if parameters:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + x.tobytes(), {"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(head))}


def grpc_infer(model: str, x: np.ndarray, parameters: dict | None = None) -> bytes:
    from vae_engine.serving import oip_grpc

    msg = oip_grpc._messages()["ModelInferRequest"](model_name=model)
    msg.inputs.add(name="items", datatype="FP32", shape=x.shape)
    msg.raw_input_contents.append(x.tobytes())
    for k, v in (parameters or {}).items():
        msg.parameters[k].int64_param = v
    return grpc_frame(msg.SerializeToString())


def direct_engine(model: str, x: np.ndarray, threads: int, max_batch: int, seconds: float) -> dict:
    """p50 of in-process Engine calls on the server's own path (loaded as `serve` loads it): the compute part."""
    from vae_engine.runtime.engine import Engine

    eng = Engine.load(model, backend="auto", precision="auto", threads=threads, batch_size=max_batch)
    out = {}
    for op, call in (("score", lambda: eng.elbo(x)), ("reconstruct", lambda: eng.reconstruct(x))):
        for _ in range(200):
            call()
        times, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[op] = {"p50_ms": float(np.percentile(times, 50)) * 1e3, "calls": len(times)}
    out["path"] = eng.path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "mnist-vae"))
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--json", default="load_test.json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    for tool in ("wrk", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install wrk nghttp2-client)")
    name = Path(args.model).name
    x = (data.load_dataset("mnist").test_images[:1].reshape(1, -1) / 255).astype(np.float32)
    item = x[0].round(4).tolist()
    xq = np.asarray([item], dtype=np.float32)  # the same numbers in every protocol
    score_json = json.dumps({"inputs": [{"name": "items", "shape": [1, 784], "datatype": "FP32", "data": item}],
                             "parameters": {"k": 1}})
    cases = {  # (protocol, op) -> how to send it: wrk requests, or a gRPC frame for h2load
        ("/v1 JSON", "score"): [Req("/v1/score", json.dumps({"items": [item], "k": 1}).encode())],
        ("/v1 JSON", "reconstruct"): [Req("/v1/reconstruct", json.dumps({"items": [item]}).encode())],
        ("v2 binary", "score"): [Req(f"/v2/models/{name}-score/infer", *v2_binary(xq, "scores", {"k": 1}))],
        ("v2 binary", "reconstruct"): [Req(f"/v2/models/{name}-reconstruct/infer",
                                           *v2_binary(xq, "reconstruction"))],
        ("v2 JSON", "score"): [Req(f"/v2/models/{name}-score/infer", score_json.encode())],
        ("v2 gRPC", "score"): grpc_infer(f"{name}-score", xq, {"k": 1}),
        ("v2 gRPC", "reconstruct"): grpc_infer(f"{name}-reconstruct", xq),
    }
    conc = [int(c) for c in args.concurrency.split(",")]
    rows, baseline = [], {}

    def run(case, c, proc, url, grpc_port, seconds):
        cpu0 = cpu_seconds(proc.pid)
        how = cases[case]
        r = (h2load(grpc_port, "ModelInfer", how, c, seconds) if isinstance(how, bytes)
             else wrk(url, how, c, seconds))
        r["cpu_ms_per_request"] = (cpu_seconds(proc.pid) - cpu0) / max(r["requests"], 1) * 1e3
        return r

    # the third server: two worker processes (each its own event loop and engine), for the protocols' main rows
    two_workers = [("/v1 JSON", "score"), ("v2 binary", "score")]
    for mode, max_batch, wait, workers in (("batching on", 256, 2.0, 1), ("batching off", 1, 0.0, 1),
                                           ("batching on", 256, 2.0, 2)):
        proc, url, grpc_port = start_server(args.model, max_batch, wait, args.server_threads, workers)
        try:
            for case in cases if workers == 1 else two_workers:  # warm-up: first calls compile, page in the model
                for _ in range(workers):
                    run(case, 16, proc, url, grpc_port, 2)
            if mode == "batching on" and workers == 1:  # the parts of the concurrency-1 target, on this server
                baseline["empty_http_p50_ms"] = wrk(url, [Req("/v2/health/live", method="GET", headers={})], 1,
                                                    args.seconds)["p50_ms"]
                live = grpc_frame(b"")
                baseline["empty_grpc_p50_ms"] = h2load(grpc_port, "ServerLive", live, 1, args.seconds)["p50_ms"]
            for case in cases if workers == 1 else two_workers:
                for c in conc if workers == 1 else [c for c in conc if c > 1]:
                    r = run(case, c, proc, url, grpc_port, args.seconds)
                    rows.append({"mode": mode, "workers": workers, "protocol": case[0], "op": case[1],
                                 "concurrency": c, **r})
                    print(rows[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    baseline["engine"] = direct_engine(args.model, xq, args.server_threads, 256, args.seconds / 2)
    print(baseline, flush=True)

    # soak: good and bad requests of both protocols mixed, concurrency 64, until soak_requests have been answered
    v2s = f"/v2/models/{name}-score/infer"
    body, headers = v2_binary(xq, "scores")
    bad = [Req("/v1/score", json.dumps({"items": [[0.5] * 3]}).encode()), Req("/v1/score", b"{not json"),
           Req("/v1/score", json.dumps({"items": [item], "k": 10**9}).encode()),
           Req("/v1/decode", json.dumps({"z": "x"}).encode()), Req("/v1/sample", json.dumps({"n": -1}).encode()),
           Req("/v1/nothing", b"{}"), Req(v2s, body[:-5], headers),  # binary part cut short
           Req(v2s, body, {**headers, "Inference-Header-Content-Length": "999999"}),
           Req(v2s, score_json.replace("FP32", "BYTES").encode()), Req(f"/v2/models/{name}-nope/infer", b"{}"),
           Req(v2s, json.dumps({"inputs": [{"name": "items", "shape": [1, 3], "datatype": "FP32",
                                            "data": [0, 1, 0]}]}).encode())]
    mix = [*cases[("/v1 JSON", "score")], *cases[("/v1 JSON", "reconstruct")], *cases[("v2 binary", "score")],
           *cases[("v2 JSON", "score")]] * 3 + bad
    proc, url, grpc_port = start_server(args.model, 256, 2.0, args.server_threads)
    try:
        wrk(url, mix, 16, 2)  # warm-up
        rss0, answered, runs = rss_mb(proc.pid), 0, 0
        while answered < args.soak_requests:
            answered += wrk(url, mix, 64, max(2.0, args.seconds / 2))["requests"]
            answered += h2load(grpc_port, "ModelInfer", cases[("v2 gRPC", "score")], 64, 1)["requests"]
            runs += 1
        codes: dict[str, float] = {}
        for key, value in metric(url, "vae_requests_total").items():
            code = re.search(r'code="(\d+)"', key).group(1)
            codes[code] = codes.get(code, 0) + value
        soak = {"requests": answered, "runs": runs, "codes": codes, "alive": proc.poll() is None,
                "rss_mb_before": rss0, "rss_mb_after": rss_mb(proc.pid),
                "five_xx": sum(v for c, v in codes.items() if c.startswith("5"))}
        print(soak, flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"rows": rows, "baseline": baseline, "soak": soak, "seconds": args.seconds,
              "server_threads": args.server_threads}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report) + "\n")


def markdown(report: dict) -> str:
    rows, b, soak = report["rows"], report["baseline"], report["soak"]
    lines = ["| protocol | op | concurrency | batching | workers | requests/s | p50 ms | p99 ms | server CPU "
             "ms/request |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["op"], r["protocol"], r["concurrency"], r["mode"], r.get("workers", 1))):
        lines.append(f"| {r['protocol']} | {r['op']} | {r['concurrency']} | {r['mode'].split()[1]} | "
                     f"{r.get('workers', 1)} | "
                     f"{r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['cpu_ms_per_request']:.3f} |")
    e = b["engine"]
    lines.append(f"\nempty request round trip p50: HTTP {b['empty_http_p50_ms']:.3f} ms, gRPC "
                 f"{b['empty_grpc_p50_ms']:.3f} ms; direct Engine call p50 ({e['path']}): score "
                 f"{e['score']['p50_ms']:.3f} ms, reconstruct {e['reconstruct']['p50_ms']:.3f} ms")
    lines.append(f"\nsoak: {soak['requests']:,} requests at concurrency 64 (good and bad mixed, both protocols): "
                 f"status codes { {k: int(v) for k, v in sorted(soak['codes'].items())} }, 5xx "
                 f"{int(soak['five_xx'])}, alive {soak['alive']}, RSS {soak['rss_mb_before']:.0f} -> "
                 f"{soak['rss_mb_after']:.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
