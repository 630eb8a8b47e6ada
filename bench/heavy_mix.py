"""The server under the costliest request its defaults admit: one-item encode requests (one client, one at a time)
timed idle, then while a heavy score request runs (items x k at the server's per-request work limit, sliced on
the engine thread); their p50/p99 against the idle ones, and how the heavy request ended. Then a heavy request
abandoned by its client: the server frees the engine at the next slice (its cancelled count in /metrics).

    python bench/heavy_mix.py --json bench/results/heavy_mix.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from vae_engine import data
from vae_engine.core import hardware

from .load_test import start_server


def encodes(url: str, x: np.ndarray, n: int) -> list[float]:
    """Seconds of n one-item /v1/encode requests sent one after another."""
    out = []
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post(f"{url}/v1/encode", json={"items": x[i % len(x)][None].tolist()})
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return out


def heavy_body(x: np.ndarray, items: int) -> bytes:
    """`items` MNIST images as a .npy body (uint8: what a client sends to stay under the body limit)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.tile((x * 255).round().astype(np.uint8), (-(-items // len(x)), 1))[:items])
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models" / "mnist-vae"))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    x = (data.load_split(data.bundled_dir(), "test")[0][:256].reshape(256, -1) / 255).astype(np.float32)
    proc, url, _ = start_server(a.model, 256, 2, a.threads)
    try:
        info = httpx.get(f"{url}/v1/info").json()
        items = info["limits"]["max_items"]
        k = max(1, info["work_limit"] // items)
        encodes(url, x, 20)  # warm
        idle = encodes(url, x, a.requests)
        heavy = {}

        def run_heavy():
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/score", params={"k": k}, content=heavy_body(x, items),
                           headers={"content-type": "application/x-npy"}, timeout=600)
            heavy.update(status=r.status_code, seconds=time.perf_counter() - t0,
                         error=None if r.status_code == 200 else r.json().get("error"))

        t = threading.Thread(target=run_heavy)
        t.start()
        time.sleep(1.0)  # the body is sent and the slices run
        loaded = encodes(url, x, a.requests)
        still_running = t.is_alive()
        t.join()
        # a client that leaves: the heavy request again, abandoned after a second
        try:
            httpx.post(f"{url}/v1/score", params={"k": k}, content=heavy_body(x, items),
                       headers={"content-type": "application/x-npy"}, timeout=1.5)
        except httpx.TimeoutException:
            pass
        time.sleep(1.0)
        metrics = httpx.get(f"{url}/metrics").text
        cancelled = sum(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("vae_cancelled_total"))
        pct = lambda v, q: float(np.percentile(np.asarray(v) * 1e3, q))  # noqa: E731
        report = {"machine": hardware.describe(a.threads), "server_threads": a.threads, "path": info["path"],
                  "work_limit_rows": info["work_limit"], "decoder_rows_per_s": info["decoder_rows_per_s"],
                  "heavy": {"items": items, "k": k, **heavy}, "requests": a.requests,
                  "encode_idle_ms": {"p50": pct(idle, 50), "p99": pct(idle, 99)},
                  "encode_beside_heavy_ms": {"p50": pct(loaded, 50), "p99": pct(loaded, 99)},
                  "p99_ratio": pct(loaded, 99) / pct(idle, 99), "heavy_still_running_after": still_running,
                  "abandoned_heavy_cancelled": cancelled, "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(report, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
