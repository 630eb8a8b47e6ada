"""Load test of `vae-engine serve` with a real HTTP load generator (wrk), batching on and off, in one run.

For /v1/score (k=1, one MNIST item per request) and /v1/reconstruct at concurrency 1, 16 and 64: requests/s and
p50/p99 latency from wrk, with micro-batching on (--max-batch 256 --max-wait-ms 2) and off (--max-batch 1);
then a soak of mixed good and bad requests at concurrency 64: status codes from the server's /metrics, the
process alive, its memory before and after.

    python bench/load_test.py --seconds 10 --markdown load.md       # needs wrk (apt-get install wrk)

Server and wrk share the machine: --server-threads (default 1) for the engine, --wrk-threads (default 1).
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
from pathlib import Path

import httpx

from vae_engine import data

LUA = """
local bodies = {%s}
local paths = {%s}
local i = 0
request = function()
  i = i + 1
  local j = (i %% #bodies) + 1
  return wrk.format("POST", paths[j], {["Content-Type"] = "application/json"}, bodies[j])
end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, max_wait_ms: float, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vae_engine", "serve", model, "--port", str(port), "--max-batch",
                             str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def wrk(url: str, bodies: list[tuple[str, str]], connections: int, seconds: float, threads: int) -> dict:
    """Run wrk with a Lua script cycling through (path, JSON body); parse requests/s and latency percentiles."""
    script = LUA % (", ".join(json.dumps(b) for _, b in bodies), ", ".join(json.dumps(p) for p, _ in bodies))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    cmd = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--latency", "-s", f.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    lat = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    return {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms(lat["50"]), "p99_ms": ms(lat["99"]),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)), "raw": out}


def metric(url: str, name: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "mnist-vae"))
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--soak-requests", type=int, default=10_000)
    ap.add_argument("--json", default="load_test.json")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    item = (data.load_dataset("mnist").test_images[0].reshape(-1) / 255).round(4).tolist()
    good = {"score": json.dumps({"items": [item], "k": 1}), "reconstruct": json.dumps({"items": [item]})}
    rows = []
    for mode, max_batch, wait in (("batching on", 256, 2.0), ("batching off", 1, 0.0)):
        proc, url = start_server(args.model, max_batch, wait, args.server_threads)
        try:
            for op in ("score", "reconstruct"):  # warm-up: first calls compile kernels and page in the model
                wrk(url, [(f"/v1/{op}", good[op])], 16, 2, args.wrk_threads)
            for op in ("score", "reconstruct"):
                for c in (1, 16, 64):
                    r = wrk(url, [(f"/v1/{op}", good[op])], c, args.seconds, args.wrk_threads)
                    rows.append({"mode": mode, "endpoint": f"/v1/{op}", "concurrency": c,
                                 **{k: v for k, v in r.items() if k != "raw"}})
                    print(rows[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    # soak: good and bad requests mixed, concurrency 64, until soak_requests have been answered
    bad = [("/v1/score", json.dumps({"items": [[0.5] * 3]})), ("/v1/score", "{not json"),
           ("/v1/score", json.dumps({"items": [item], "k": 10**9})), ("/v1/decode", json.dumps({"z": "x"})),
           ("/v1/sample", json.dumps({"n": -1})), ("/v1/nothing", "{}")]
    mix = [("/v1/score", good["score"]), ("/v1/reconstruct", good["reconstruct"])] * 3 + bad
    proc, url = start_server(args.model, 256, 2.0, args.server_threads)
    try:
        wrk(url, mix, 16, 2, args.wrk_threads)  # warm-up
        rss0, answered, runs = rss_mb(proc.pid), 0, 0
        while answered < args.soak_requests:
            answered += wrk(url, mix, 64, max(2.0, args.seconds / 2), args.wrk_threads)["requests"]
            runs += 1
        codes: dict[str, float] = {}
        for key, value in metric(url, "vae_requests_total").items():
            code = re.search(r'code="(\d+)"', key).group(1)
            codes[code] = codes.get(code, 0) + value
        soak = {"requests": answered, "wrk_runs": runs, "codes": codes, "alive": proc.poll() is None,
                "rss_mb_before": rss0, "rss_mb_after": rss_mb(proc.pid),
                "five_xx": sum(v for c, v in codes.items() if c.startswith("5"))}
        print(soak, flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"rows": rows, "soak": soak, "seconds": args.seconds, "server_threads": args.server_threads,
              "wrk_threads": args.wrk_threads}
    Path(args.json).write_text(json.dumps(report, indent=2))
    lines = ["| endpoint | concurrency | batching | requests/s | p50 ms | p99 ms |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["endpoint"], r["concurrency"], r["mode"])):
        lines.append(f"| {r['endpoint']} | {r['concurrency']} | {r['mode'].split()[1]} | {r['requests_per_s']:,.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines.append(f"\nsoak: {soak['requests']:,} requests at concurrency 64 (good and bad mixed): status codes "
                 f"{ {k: int(v) for k, v in sorted(soak['codes'].items())} }, 5xx {int(soak['five_xx'])}, alive "
                 f"{soak['alive']}, RSS {soak['rss_mb_before']:.0f} -> {soak['rss_mb_after']:.0f} MB")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
