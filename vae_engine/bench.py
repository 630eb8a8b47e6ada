"""One timing recipe for every backend: warm up, then repeat; latency percentiles, throughput, GFLOP/s against
the machine's own fp32 GEMM peak measured in the same run."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, graphs, kernels, rng
from .config import INPUT_DIM, ModelConfig
from .engine import Engine

OPS = ("encode", "decode", "reconstruct")
BATCHES = (1, 64, 1024, 8192)
QUICK_BATCHES = (1, 1024)
# (label, backend, variant); the label is what tables, JSON and charts show
CANDIDATES = (
    ("torch", "torch", "fp32"),
    ("torch-compile", "torch-compile", "fp32"),
    ("ort-fp32", "onnxruntime", "fp32"),
    ("ort-opt", "onnxruntime", "optimized"),
    ("ort-int8", "onnxruntime", "int8"),
)
QUICK = ("torch", "ort-fp32", "ort-int8")  # torch.compile alone takes ~20 s to compile here


@dataclass
class Timing:
    """Per-call latencies of one measured function."""

    seconds: np.ndarray  # (repeats,)

    def summary(self, items: int, flops: float = 0.0) -> dict[str, float]:
        p50, p90, p99 = np.percentile(self.seconds, [50, 90, 99])
        return {"repeats": len(self.seconds), "mean_us": float(self.seconds.mean() * 1e6), "p50_us": float(p50 * 1e6),
                "p90_us": float(p90 * 1e6), "p99_us": float(p99 * 1e6), "samples_per_s": float(items / p50),
                "gflops": float(flops * items / p50 / 1e9)}


def measure(fn: Callable[[], Any], min_time: float = 0.5, warmup: int = 3, min_repeats: int = 5,
            max_repeats: int = 2000) -> Timing:
    """Warm up, then call fn repeatedly (at least min_repeats, until min_time has passed), timing each call."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_repeats or (time.perf_counter() < t_end and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(np.asarray(times))


def op_call(engine: Engine, op: str, x: np.ndarray, z: np.ndarray) -> Callable[[], Any]:
    """The measured call of an op: backend encode/decode, or the engine's full reconstruct (encode, sample, decode)."""
    be = engine.backend
    return {"encode": lambda: be.encode(x), "decode": lambda: be.decode(z),
            "reconstruct": lambda: engine.reconstruct(x, sample=True)}[op]


def _layer_flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    """2 * multiply-adds of the Linear/Conv layers of `module` for one input row, counted with forward hooks."""
    total = [0.0]

    def hook(m, inputs, output):
        if isinstance(m, torch.nn.Linear):
            total[0] += 2.0 * m.in_features * m.out_features * output.shape[0]
        elif isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            kh, kw = m.kernel_size
            spatial = (output if isinstance(m, torch.nn.Conv2d) else inputs[0]).shape
            total[0] += 2.0 * m.in_channels * m.out_channels * kh * kw * spatial[0] * spatial[2] * spatial[3]

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total[0] / x.shape[0]


def model_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs per sample of the encoder and decoder (2 per multiply-add; activations not counted)."""
    from .model import VAE

    vae = VAE(cfg)
    enc = _layer_flops(vae.encoder, torch.rand(2, cfg.input_dim))
    dec = _layer_flops(vae.decoder, torch.rand(2, cfg.latent_dim))
    return {"encode": enc, "decode": dec, "reconstruct": enc + dec}


def gemm_peak(threads: int, n: int = 2048, min_time: float = 0.5) -> dict[str, float]:
    """Best fp32 GEMM rate (GFLOP/s) of NumPy, PyTorch and ONNX Runtime on an n x n x n product."""
    import onnx
    from onnx import TensorProto, helper

    g = np.random.default_rng(0)
    a, b = g.standard_normal((n, n), np.float32), g.standard_normal((n, n), np.float32)
    flops = 2.0 * n**3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    onnx.checker.check_model(model)
    sess = graphs.make_session(model, threads)
    fns = {"numpy": lambda: a @ b, "torch": lambda: ta @ tb, "onnxruntime": lambda: sess.run(None, {"a": a, "b": b})}
    out = {}
    for name, fn in fns.items():
        t = measure(fn, min_time=min_time, warmup=2, min_repeats=3)
        out[name] = flops / float(np.min(t.seconds)) / 1e9  # peak: best call
    return out


def machine(threads: int) -> dict[str, Any]:
    """CPU model, cores and threads used."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def postprocess_fns(x, params, mu, logvar, eps, likelihood=None) -> dict[str, Callable[[], Any]]:
    """The ELBO/IWAE math on decoder outputs (reparameterize, log-weights, log-mean-exp over K) three ways:
    the Numba kernels, their NumPy twins (float64), and PyTorch with the likelihood's own torch form."""
    from .likelihoods import get

    lk = likelihood or get("bernoulli")
    k = eps.shape[1]

    def numba_path():
        z = kernels.reparameterize(mu, logvar, eps)
        return kernels.log_mean_exp(kernels.log_weights(x, params, z, mu, logvar, lk))

    def numpy_path():
        z = kernels.reparameterize_numpy(mu, logvar, eps)
        return kernels.log_mean_exp_numpy(kernels.log_weights_numpy(x, params, z, mu, logvar, lk))

    tx, tp, tmu, tlv, te = (torch.from_numpy(a) for a in (x, params, mu, logvar, eps))

    def torch_path():
        with torch.inference_mode():
            z = tmu[:, None] + torch.exp(0.5 * tlv)[:, None] * te
            log_px = lk.log_prob(tx[:, None], tp)
            lw = log_px - 0.5 * torch.sum(z**2 - tlv[:, None] - (z - tmu[:, None]) ** 2 * torch.exp(-tlv)[:, None], -1)
            return (torch.logsumexp(lw, -1) - np.log(k)).numpy()

    return {"numba": numba_path, "numpy": numpy_path, "torch": torch_path}


def postprocess_bench(b: int = 1024, k: int = 64, d: int = 20, min_time: float = 0.5) -> list[dict]:
    """Time the ELBO/IWAE math at B x K: Numba vs NumPy vs PyTorch, with each one's error against NumPy."""
    g = np.random.default_rng(0)
    x = (g.random((b, INPUT_DIM)) < 0.3).astype(np.float32)  # an MNIST-sized item: 784 features
    logits = (g.standard_normal((b, k, INPUT_DIM)) * 4).astype(np.float32)
    mu, logvar = g.standard_normal((b, d)).astype(np.float32), (g.standard_normal((b, d)) - 1).astype(np.float32)
    fns = postprocess_fns(x, logits, mu, logvar, rng.normal_eps(0, 0, b, k, d))
    ref = np.asarray(fns["numpy"](), np.float64)
    rows = []
    for name, fn in fns.items():
        err = float(np.max(np.abs(np.asarray(fn(), np.float64) - ref) / np.abs(ref)))
        t = measure(fn, min_time=min_time, warmup=1, min_repeats=3)
        rows.append({"op": f"elbo-math K={k}", "backend": name, "batch": b, **t.summary(b),
                     "max_rel_err_vs_numpy": err})
    # the same fused log-weights for a Gaussian likelihood ([mean | logvar] per feature), against its twin
    from .likelihoods import get

    params = np.concatenate([logits * 0.25, np.clip(logits, -3, 3) * 0.5], axis=-1).astype(np.float32)
    gauss = postprocess_fns(x, params, mu, logvar, rng.normal_eps(0, 0, b, k, d), get("gaussian"))
    ref = gauss["numpy"]()
    gaussian_path = gauss["numba"]
    err = float(np.max(np.abs(np.asarray(gaussian_path(), np.float64) - ref) / np.abs(ref)))
    t = measure(gaussian_path, min_time=min_time, warmup=1, min_repeats=3)
    rows.append({"op": f"elbo-math K={k}", "backend": "numba-gaussian", "batch": b, **t.summary(b),
                 "max_rel_err_vs_numpy": err})
    return rows


def benchmark(model_dir: str | Path, labels: tuple[str, ...] | None = None, batches: tuple[int, ...] | None = None,
        ops: tuple[str, ...] = OPS, threads: int | None = None, quick: bool = False, spin: bool = False,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark every (backend, op, batch) in one process with one recipe; returns the report (fixed schema)."""
    import numba
    import onnxruntime

    step = progress or (lambda message: None)
    model_dir = Path(model_dir)
    cfg = checkpoint.model_config(model_dir)
    threads = threads or os.cpu_count() or 1
    labels = labels or (QUICK if quick else tuple(c[0] for c in CANDIDATES))
    batches = batches or (QUICK_BATCHES if quick else BATCHES)
    min_time = 0.1 if quick else 0.6
    flops = model_flops(cfg)
    g = np.random.default_rng(0)
    x_all = (g.random((max(batches), cfg.input_dim)) < 0.3).astype(np.float32)
    z_all = g.standard_normal((max(batches), cfg.latent_dim)).astype(np.float32)

    step("GEMM peak")
    from .backends import set_threads

    set_threads(threads)
    peak = gemm_peak(threads, min_time=0.3 if quick else 1.0)
    best_peak = max(peak.values())
    results, notes = [], []
    for label in labels:
        spec = {c[0]: c for c in CANDIDATES}.get(label)
        if spec is None:
            raise ValueError(f"unknown bench backend {label!r}: choose from {', '.join(c[0] for c in CANDIDATES)}")
        _, backend, variant = spec
        if backend == "onnxruntime" and not graphs.graph_path(model_dir, "encoder", variant).is_file():
            notes.append(f"{label}: skipped, {graphs.graph_path(model_dir, 'encoder', variant).name} not exported")
            continue
        step(f"load {label}")
        engine = Engine.load(model_dir, backend=backend, threads=threads, variant=variant, spin=spin)
        be = engine.backend
        for op in ops:
            for n in batches:
                step(f"{label} {op} batch {n}")
                fn = op_call(engine, op, x_all[:n], z_all[:n])
                t = measure(fn, min_time=min_time, warmup=5 if backend != "torch-compile" else 10)
                row = {"op": op, "backend": label, "engine_backend": backend, "variant": variant,
                       "provider": be.provider, "batch": n, "threads": threads, "dtype": "float32",
                       **t.summary(n, flops[op])}
                row["fraction_of_peak"] = row["gflops"] / best_peak
                results.append(row)
    if not torch.cuda.is_available():
        notes.append("torch-cuda / onnxruntime CUDA / TensorRT rows skipped: no CUDA GPU on this machine")
    step("ELBO/IWAE post-processing")
    post = postprocess_bench(min_time=min_time)
    _add_ratios(results)
    return {
        "schema": "vae-engine-bench/1", "model_dir": str(model_dir), "model": {"arch": cfg.arch,
        "latent_dim": cfg.latent_dim, "hidden": list(cfg.hidden)}, "flops_per_sample": flops,
        "machine": machine(threads), "versions": {**checkpoint.versions(), "numba_threads": numba.get_num_threads(),
        "ort_providers": onnxruntime.get_available_providers()}, "gemm_peak_gflops": peak,
        "gemm_peak_best_gflops": best_peak, "quick": quick, "spin": spin, "results": results,
        "postprocess": post, "notes": notes,
    }


def _add_ratios(results: list[dict]) -> None:
    """Throughput of each row relative to PyTorch eager at the same op and batch."""
    base = {(r["op"], r["batch"]): r["samples_per_s"] for r in results if r["backend"] == "torch"}
    for r in results:
        ref = base.get((r["op"], r["batch"]))
        r["speedup_vs_torch"] = r["samples_per_s"] / ref if ref else None


def markdown(report: dict[str, Any], batches: tuple[int, ...] = (1, 1024)) -> str:
    """A Markdown table of a report (for the README), rows at the given batch sizes."""
    lines = ["| op | batch | backend | p50 / p90 / p99 us | samples/s | GFLOP/s | % of GEMM peak | x torch |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        if r["batch"] in batches:
            ratio = f"{r['speedup_vs_torch']:.2f}" if r["speedup_vs_torch"] else "-"
            lines.append(f"| {r['op']} | {r['batch']} | {r['backend']} | {r['p50_us']:.0f} / {r['p90_us']:.0f} / "
                         f"{r['p99_us']:.0f} | {r['samples_per_s']:,.0f} | {r['gflops']:.0f} | "
                         f"{100 * r['fraction_of_peak']:.0f} | {ratio} |")
    lines += ["", "| ELBO/IWAE math, B=1024, K=64 | p50 ms | x Numba | max rel. error vs NumPy |",
              "| --- | ---: | ---: | ---: |"]
    numba_p50 = next(r["p50_us"] for r in report["postprocess"] if r["backend"] == "numba")
    for r in report["postprocess"]:
        lines.append(f"| {r['backend']} | {r['p50_us'] / 1e3:.1f} | {r['p50_us'] / numba_p50:.1f} | "
                     f"{r['max_rel_err_vs_numpy']:.1e} |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> list:
    """The report as rich renderables for a terminal of 80 columns (p90 and full names are in the JSON and
    markdown outputs)."""
    from rich import box
    from rich.table import Table

    parts: list = []
    peak = report["gemm_peak_gflops"]
    m = report["machine"]
    parts.append(f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads")
    parts.append("fp32 GEMM peak (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    # fits 80 columns: p90 and full names are in the JSON and --markdown outputs
    table = Table(title="backends", caption="recon = reconstruct; x torch = throughput / PyTorch eager's",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("op", "B", "backend", "p50 us", "p99 us", "items/s", "GFLOP/s", "%peak", "x torch"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["results"]:
        ratio = f"{r['speedup_vs_torch']:.2f}" if r["speedup_vs_torch"] else "-"
        table.add_row({"reconstruct": "recon"}.get(r["op"], r["op"]), str(r["batch"]), r["backend"],
                      f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['samples_per_s'] / 1e3:.1f}k",
                      f"{r['gflops']:.0f}", f"{100 * r['fraction_of_peak']:.0f}", ratio)
    parts.append(table)
    post = Table(title="ELBO/IWAE math on decoder outputs (B=1024, K=64)")
    for col in ("implementation", "p50 ms", "x numba", "max rel err vs NumPy"):
        post.add_column(col, justify="right")
    numba_p50 = next(r["p50_us"] for r in report["postprocess"] if r["backend"] == "numba")
    for r in report["postprocess"]:
        post.add_row(r["backend"], f"{r['p50_us'] / 1e3:.2f}", f"{r['p50_us'] / numba_p50:.1f}",
                     f"{r['max_rel_err_vs_numpy']:.1e}")
    parts.append(post)
    for note in report["notes"]:
        parts.append(f"note: {note}")
    return parts
