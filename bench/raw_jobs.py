"""The same work as each `vae-engine` job, written as a user of ONNX Runtime alone would: import onnxruntime and
NumPy, read the input, run the graphs in 1,024-row chunks, do the likelihood's arithmetic in NumPy, save. The
job benchmark (`bench/jobs_bench.py`) times each job's whole command against its twin here, so the ratio is what
the engine's start-up, checks and decisions cost a user on top of the runtime.

Usage: python bench/raw_jobs.py JOB MODEL_DIR INPUT OUTPUT [K]
(a Bernoulli model with a VampPrior, as the shipped one; the twins skip every check the engine makes.)
"""

from __future__ import annotations

import gzip
import sys

import numpy as np
import onnxruntime as ort

CHUNK = 1024
LOG_2PI = float(np.log(2 * np.pi))


def session(model: str, role: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(f"{model}/{role}.onnx", opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, a: np.ndarray) -> list[np.ndarray]:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: a[i:i + CHUNK]}) for i in range(0, len(a), CHUNK)]
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def read_items(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        x = np.load(path)
    else:
        with gzip.open(path) as f:
            buf = f.read()
        x = np.frombuffer(buf, np.uint8, offset=16).reshape(int.from_bytes(buf[4:8], "big"), -1)
    return (x.reshape(len(x), -1) / np.float32(255)).astype(np.float32)


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-a))


def bernoulli_log_prob(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    return -(np.logaddexp(0, logits) - logits * x).sum(-1)


def save(out: str, a: np.ndarray) -> None:
    if out.endswith(".png"):
        from PIL import Image

        n = len(a)
        cols = int(np.ceil(np.sqrt(n)))
        grid = np.ones((cols * 29 + 1, cols * 29 + 1), np.float32)
        for i, img in enumerate(a.reshape(n, 28, 28)):
            r, c = divmod(i, cols)
            grid[1 + r * 29:1 + r * 29 + 28, 1 + c * 29:1 + c * 29 + 28] = img
        Image.fromarray((grid * 255).round().astype(np.uint8), "L").save(out)
    else:
        np.save(out, a)


def prior_sample(model: str, n: int, rng: np.random.Generator) -> np.ndarray:
    from safetensors.numpy import load_file

    prior = load_file(f"{model}/prior.safetensors")
    c = rng.integers(0, len(prior["mu"]), n)
    eps = rng.standard_normal((n, prior["mu"].shape[1]), np.float32)
    return (prior["mu"][c] + np.exp(0.5 * prior["logvar"][c]) * eps).astype(np.float32)


def scores(model: str, x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """IWAE NLL (k > 1) or -ELBO (k = 1, one sample) per item, with a VampPrior's mixture log-density."""
    from safetensors.numpy import load_file

    prior = load_file(f"{model}/prior.safetensors")
    pmu, plv = prior["mu"].astype(np.float64), prior["logvar"].astype(np.float64)
    inv = np.exp(-plv)  # log N(z; m, s^2) = [z^2, z] @ [-inv/2, m inv]^T + const: one GEMM per block
    weights = np.concatenate([-0.5 * inv, pmu * inv], axis=1).T
    const = -0.5 * ((pmu * pmu * inv).sum(1) + plv.sum(1) + pmu.shape[1] * LOG_2PI)
    mu, logvar = run(session(model, "encoder"), x)
    dec = session(model, "decoder")
    out = np.empty(len(x))
    step = max(1, CHUNK * 16 // k)
    for i in range(0, len(x), step):
        m, lv, xb = mu[i:i + step], logvar[i:i + step], x[i:i + step]
        eps = rng.standard_normal((len(m), k, m.shape[1]), np.float32)
        z = m[:, None] + np.exp(0.5 * lv)[:, None] * eps
        logits = run(dec, z.reshape(-1, z.shape[-1]))[0].reshape(len(m), k, -1)
        log_px = bernoulli_log_prob(logits, xb[:, None])
        log_q = -0.5 * (LOG_2PI + lv[:, None] + eps ** 2).sum(-1)
        zz = z.reshape(-1, z.shape[-1]).astype(np.float64)
        log_n = np.concatenate([zz * zz, zz], axis=1) @ weights + const  # (rows, C)
        top = log_n.max(-1, keepdims=True)
        log_p = (top[:, 0] + np.log(np.exp(log_n - top).mean(-1))).reshape(len(m), k)
        log_w = log_px + log_p - log_q
        out[i:i + len(m)] = -(np.logaddexp.reduce(log_w, axis=-1) - np.log(k))
    return out


def main(job: str, model: str, src: str, out: str, k: int = 1) -> None:
    rng = np.random.default_rng(0)
    if job == "encode":
        save(out, run(session(model, "encoder"), read_items(src))[0])
    elif job == "decode":
        save(out, sigmoid(run(session(model, "decoder"), np.load(src).astype(np.float32))[0]))
    elif job == "reconstruct":
        mu = run(session(model, "encoder"), read_items(src))[0]
        save(out, sigmoid(run(session(model, "decoder"), mu)[0]))
    elif job == "sample":
        save(out, sigmoid(run(session(model, "decoder"), prior_sample(model, int(src), rng))[0]))
    elif job == "score":
        save(out, scores(model, read_items(src), k, rng).astype(np.float32))
    elif job == "detect":  # the reconstruction rule: squared error of E[x|mu], flagged above a threshold
        x = read_items(src)
        mu = run(session(model, "encoder"), x)[0]
        err = ((sigmoid(run(session(model, "decoder"), mu)[0]) - x) ** 2).sum(-1)
        save(out, np.where(err > np.quantile(err, 0.9), -1, 1).astype(np.int8))
    elif job == "serve":  # ready to answer: both graphs open behind FastAPI on uvicorn, until /health answers
        import threading

        import fastapi
        import uvicorn

        sessions = {role: session(model, role) for role in ("encoder", "decoder")}
        app = fastapi.FastAPI()
        app.get("/health")(lambda: {"ready": bool(sessions)})
        server = uvicorn.Server(uvicorn.Config(app, port=int(src), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        import time
        import urllib.request

        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{src}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.01)
        server.should_exit = True
        thread.join(30)  # a process that exits while uvicorn's thread still runs can crash at finalization
    else:
        raise SystemExit(f"unknown job {job!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], *(int(a) for a in sys.argv[5:]))
