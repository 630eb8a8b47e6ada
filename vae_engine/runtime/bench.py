"""One timing recipe for every backend: warm up, then repeat; latency percentiles, throughput, GFLOP/s against
the machine's own GEMM peak for that precision (fp32, bf16, int8; CPU and GPU), measured in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import modeldir
from ..core import hardware, rng
from ..core.config import INPUT_DIM, ModelConfig
from ..model import kernels
from ..model.estimators import log_weight
from ..model.posterior import DiagonalGaussian, standard_normal_log_prob
from ..modeldir import graphs
from ..perf.fraction import fraction_of, peak_key, percent
from ..perf.peaks import gemm_peak, limit_seconds
from ..perf.timing import measure
from ..perf.work import macs_by_precision, model_flops
from . import tuning
from .engine import Engine

OPS = ("encode", "decode", "reconstruct")
BATCHES = (1, 64, 1024, 8192)
QUICK_BATCHES = (1, 1024)
OVERHEAD_BATCHES = (1,)  # where the engine's per-call cost over the raw runtime matters


@dataclass(frozen=True)
class Candidate:
    """One benchmarked path; the label is what tables, JSON and charts show."""

    label: str
    backend: str
    precision: str = "fp32"
    device: str = "cpu"
    variant: str | None = None  # an ONNX graph file other than the precision's own (ort-opt)


def _candidates() -> tuple[Candidate, ...]:
    """Every benchmarked path: each registry path with a label (CPU paths first), and ONNX Runtime on the
    graph-optimized fp32 variant (`export --optimize`)."""
    from .backends import REGISTRY

    paths = [Candidate(p.label, name, p.precision, p.device)
             for name, spec in REGISTRY.items() for p in spec.paths if p.label]
    paths.insert(next(i for i, c in enumerate(paths) if c.label == "ort-fp32") + 1,
                 Candidate("ort-opt", "onnxruntime", variant="optimized"))
    return tuple(sorted(paths, key=lambda c: c.device != "cpu"))


CANDIDATES = _candidates()
BY_LABEL = {c.label: c for c in CANDIDATES}
QUICK = ("torch", "ort-fp32", "ort-int8")  # torch.compile alone takes ~20 s to compile here


def load_candidate(model_dir: Path, c: Candidate, threads: int, spin: bool = False) -> Engine:
    """An engine on the candidate's path; VaeEngineError says why it cannot run here (not exported, no GPU...)."""
    from ..core.errors import VaeEngineError
    from .backends import load_backend, unavailable
    from .backends.ort import OrtBackend

    why = unavailable(c.backend, c.precision, c.device, None if c.variant else model_dir)
    if why:
        raise VaeEngineError(why)
    if c.precision == "bf16" and c.device == "cpu" and c.backend == "torch" and not hardware.native_bf16():
        raise VaeEngineError("no native bf16 on this CPU (torch would emulate it, far slower than fp32)")
    cfg = modeldir.model_config(model_dir)
    if c.variant:
        backend = OrtBackend(model_dir, cfg, c.precision, threads, c.device, spin, variant=c.variant)
    else:
        backend = load_backend(model_dir, c.backend, c.precision, threads, c.device, spin)
    return Engine(backend, cfg, model_dir, threads)


def op_call(engine: Engine, op: str, x: np.ndarray, z: np.ndarray) -> Callable[[], Any]:
    """The measured call of an op, as a user makes it: `Engine.encode`, `Engine.decode` (the likelihood's
    parameters) or `Engine.reconstruct` as the `reconstruct` job runs it (the input rule, encode, decode of the
    posterior mean, the likelihood's mean; one fused call on ONNX Runtime). Each includes the engine's checks."""
    return {"encode": lambda: engine.encode(x), "decode": lambda: engine.decode(z, params=True),
            "reconstruct": lambda: engine.reconstruct(x)}[op]


def raw_call(engine: Engine, op: str, x: np.ndarray, z: np.ndarray) -> Callable[[], Any]:
    """The same op on the runtime alone (`backends.RAW_CALL`), for the engine's overhead over it."""
    return engine.backend.raw_call(op, z if op == "decode" else x)


def path_peak(model_dir: Path, cfg: ModelConfig, c: Candidate, op: str, best_peak: dict[str, float]) -> float | None:
    """The GEMM rate a path's row is compared with: its precision's peak, or for an int8 graph pair that keeps
    some layers in fp32, the rate of doing each layer's multiply-adds at its own precision's peak."""
    if c.device != "cpu" or c.backend != "onnxruntime" or c.precision != "int8":
        return best_peak.get(peak_key(c.precision, c.device))
    macs: dict[str, float] = {}
    for role in {"encode": ("encoder",), "decode": ("decoder",)}.get(op, graphs.ROLES):
        for p, m in macs_by_precision(model_dir, cfg, role, c.precision, c.backend).items():
            macs[p] = macs.get(p, 0.0) + m
    seconds = limit_seconds(macs, best_peak)
    return 2 * sum(macs.values()) / seconds / 1e9 if seconds else None


def postprocess_fns(x, params, mu, logvar, eps, likelihood=None) -> dict[str, Callable[[], Any]]:
    """The ELBO/IWAE math on decoder outputs (reparameterize, log-weights, log-mean-exp over K) three ways:
    the Numba kernels, their NumPy twins (float64), and PyTorch with the likelihood's own torch form."""
    from ..model.likelihoods import get

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
            q = DiagonalGaussian(tmu, tlv)
            z = q.sample(te)
            lw = log_weight(lk, standard_normal_log_prob, tx[:, None], tp, z, q)
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
    from ..model.likelihoods import get

    params = np.concatenate([logits * 0.25, np.clip(logits, -3, 3) * 0.5], axis=-1).astype(np.float32)
    gauss = postprocess_fns(x, params, mu, logvar, rng.normal_eps(0, 0, b, k, d), get("gaussian"))
    ref = gauss["numpy"]()
    gaussian_path = gauss["numba"]
    err = float(np.max(np.abs(np.asarray(gaussian_path(), np.float64) - ref) / np.abs(ref)))
    t = measure(gaussian_path, min_time=min_time, warmup=1, min_repeats=3)
    rows.append({"op": f"elbo-math K={k}", "backend": "numba-gaussian", "batch": b, **t.summary(b),
                 "max_rel_err_vs_numpy": err})
    return rows


def auto_label(decision: dict[str, Any]) -> str | None:
    """The bench label of the path a `tuning.choose` decision takes (None: a path bench does not time)."""
    return next((c.label for c in CANDIDATES if c.variant is None
                 and (c.backend, c.precision, c.device) == (decision["backend"], decision["precision"], "cpu")), None)


def benchmark(model_dir: str | Path, labels: tuple[str, ...] | None = None, batches: tuple[int, ...] | None = None,
        ops: tuple[str, ...] = OPS, threads: int | None = None, quick: bool = False, spin: bool = False,
        progress: Callable[[str], None] | None = None, auto: bool = True) -> dict[str, Any]:
    """Benchmark every (backend, op, batch) in one process with one recipe; returns the report (fixed schema).
    `auto` (not with `quick`): also mark, at each batch size, the row `--precision auto` takes on the CPU at
    this thread count (`tuning.choose`: reused from tuning.json, or measured, ~10 s per batch size)."""
    import numba
    import onnxruntime

    step = progress or (lambda message: None)
    model_dir = Path(model_dir)
    cfg = modeldir.model_config(model_dir)
    threads = threads or hardware.available_cpus()  # the affinity mask and cgroup quota, not the host's cores
    labels = labels or (QUICK if quick else tuple(c.label for c in CANDIDATES))
    batches = batches or (QUICK_BATCHES if quick else BATCHES)
    min_time = 0.1 if quick else 0.6
    flops = model_flops(cfg, model_dir)
    g = np.random.default_rng(0)
    x_all = (g.random((max(batches), cfg.input_dim)) < 0.3).astype(np.float32)
    z_all = g.standard_normal((max(batches), cfg.latent_dim)).astype(np.float32)

    step("GEMM peaks")
    from ..core.errors import VaeEngineError
    from .backends import set_threads

    set_threads(threads)
    peaks = gemm_peak(threads, min_time=0.3 if quick else 1.0)
    best_peak = {precision: max(rates.values()) for precision, rates in peaks.items()}
    results, notes = [], []
    for label in labels:
        c = BY_LABEL.get(label)
        if c is None:
            raise VaeEngineError(f"unknown bench backend {label!r}: choose from {', '.join(BY_LABEL)}")
        step(f"load {label}")
        try:
            engine = load_candidate(model_dir, c, threads, spin)
        except VaeEngineError as exc:
            notes.append(f"{label}: skipped, {exc}")
            continue
        be = engine.backend
        for op in ops:
            for n in batches:
                step(f"{label} {op} batch {n}")
                fn = op_call(engine, op, x_all[:n], z_all[:n])
                t = measure(fn, min_time=min_time, warmup=5 if c.backend != "torch-compile" else 10)
                row = {"op": op, "backend": label, "engine_backend": c.backend, "precision": c.precision,
                       "device": c.device, "provider": be.provider, "batch": n, "threads": threads,
                       **t.summary(n, flops[op])}
                if n in OVERHEAD_BATCHES:  # the runtime alone, timed right after the engine's call
                    raw = measure(raw_call(engine, op, x_all[:n], z_all[:n]), min_time=min_time, warmup=5)
                    row["raw_p50_us"] = float(np.median(raw.seconds) * 1e6)
                    row["overhead_us"] = row["p50_us"] - row["raw_p50_us"]
                row["peak_gflops"] = path_peak(model_dir, cfg, c, op, best_peak)
                row["fraction_of_peak"] = fraction_of(row["gflops"], row["peak_gflops"])
                results.append(row)
    if not torch.cuda.is_available():
        notes.append("GPU rows (torch-cuda*, ort-cuda*) skipped: no CUDA GPU on this machine")
    chosen = {}
    for n in batches if auto and not quick else ():
        step(f"--precision auto at batch {n}")
        decision = tuning.choose(Engine.load, model_dir, "auto", "cpu", threads, n, tuning.DEFAULT_BUDGET)
        chosen[n] = {"label": auto_label(decision),
                     "path": tuning.describe_path(decision["backend"], decision["precision"], decision)}
    for r in results:
        r["auto"] = r["batch"] in chosen and r["backend"] == chosen[r["batch"]]["label"]
    for n, c in chosen.items():
        if not any(r["auto"] and r["batch"] == n for r in results):
            notes.append(f"batch {n}: --precision auto takes {c['path']}, not among these rows")
    step("ELBO/IWAE post-processing")
    post = postprocess_bench(min_time=min_time)
    _add_ratios(results)
    return {
        "schema": "vae-engine-bench/2", "date": time.strftime("%Y-%m-%d"), "model_dir": str(model_dir),
        "model": {"arch": cfg.arch,
        "latent_dim": cfg.latent_dim, "hidden": list(cfg.hidden)}, "flops_per_sample": flops,
        "machine": hardware.describe(threads),
        "versions": {**modeldir.versions(), "numba_threads": numba.get_num_threads(),
        "ort_providers": onnxruntime.get_available_providers()}, "gemm_peak_gflops": peaks,
        "gemm_peak_best_gflops": best_peak, "quick": quick, "spin": spin,
        "auto": {str(n): c for n, c in chosen.items()}, "results": results,
        "postprocess": post, "notes": notes,
    }


def _add_ratios(results: list[dict]) -> None:
    """Throughput of each row relative to PyTorch eager at the same op and batch."""
    base = {(r["op"], r["batch"]): r["samples_per_s"] for r in results if r["backend"] == "torch"}
    for r in results:
        ref = base.get((r["op"], r["batch"]))
        r["speedup_vs_torch"] = r["samples_per_s"] / ref if ref else None


AUTO_MARK = (f"* the path --precision auto takes at that batch size (the fastest within {tuning.DEFAULT_BUDGET} "
             "nats, this thread count)")


def _name(row: dict[str, Any]) -> str:
    return row["backend"] + ("*" if row.get("auto") else "")


def peaks_line(peaks: dict[str, dict[str, float]]) -> str:
    """'GEMM peaks (GFLOP/s): fp32 numpy 190 torch 201 ...; bf16 torch 90; int8 onnxruntime 410'."""
    return "GEMM peaks (GFLOP/s): " + "; ".join(
        f"{precision} " + " ".join(f"{lib} {rate:.0f}" for lib, rate in rates.items())
        for precision, rates in peaks.items())


SECTION = "bench-table"  # the generated section of docs/benchmarks/backends.md (`perf.pages`)


def describe_run(report: dict[str, Any]) -> str:
    """One line naming a report's machine, versions, date and command."""
    m, v = report["machine"], report["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "openvino", "numba") if v.get(k))
    return (f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags'])}; {m['threads']} threads; "
            f"Python {v['python']}; {libs}; {report.get('date', 'date not recorded')}; "
            f"`{report.get('command', 'vae-engine bench')}`.")


def markdown(report: dict[str, Any], batches: tuple[int, ...] = (1, 1024)) -> str:
    """A Markdown table of a report (for docs/benchmarks/backends.md), rows at the given batch sizes, under the
    line that names its machine, versions, date and command."""
    lines = [describe_run(report), "",
             "| op | batch | backend | p50 / p90 / p99 us | samples/s | GFLOP/s | % of peak | x torch "
             "| raw runtime p50 us (engine overhead) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        if r["batch"] in batches:
            ratio = f"{r['speedup_vs_torch']:.2f}" if r["speedup_vs_torch"] else "-"
            raw = f"{r['raw_p50_us']:.0f} ({r['overhead_us']:+.0f})" if "raw_p50_us" in r else "-"
            lines.append(f"| {r['op']} | {r['batch']} | {_name(r)} | {r['p50_us']:.0f} / {r['p90_us']:.0f} / "
                         f"{r['p99_us']:.0f} | {r['samples_per_s']:,.0f} | {r['gflops']:.0f} | "
                         f"{percent(r['fraction_of_peak'], sign=False)} | {ratio} | {raw} |")
    lines += ["", peaks_line(report["gemm_peak_gflops"])] + ([AUTO_MARK] if report.get("auto") else [])
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
    parts.append(f"{m['cpu']} ({' '.join(m['flags']) or 'no AVX2'}), {m['cores']} cores, {m['threads']} threads"
                 + (f"; GPU {m['gpu']}" if m.get("gpu") else ""))
    parts.append(peaks_line(peak))
    # fits 80 columns: p90 and full names are in the JSON and --markdown outputs
    table = Table(title="backends", caption="recon = reconstruct; x torch = throughput / PyTorch eager's",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("op", "B", "backend", "p50 us", "p99 us", "items/s", "GFLOP/s", "%peak", "x torch"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["results"]:
        ratio = f"{r['speedup_vs_torch']:.2f}" if r["speedup_vs_torch"] else "-"
        table.add_row({"reconstruct": "recon"}.get(r["op"], r["op"]), str(r["batch"]), _name(r),
                      f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['samples_per_s'] / 1e3:.1f}k",
                      f"{r['gflops']:.0f}", percent(r["fraction_of_peak"], sign=False), ratio)
    parts.append(table)
    if report.get("auto"):
        parts.append(AUTO_MARK)
    raw_rows = [r for r in report["results"] if "raw_p50_us" in r]
    if raw_rows:
        over = Table(title="engine overhead: the engine's call against the runtime alone (backends.RAW_CALL)")
        for col in ("op", "B", "backend", "engine p50 us", "raw p50 us", "overhead us"):
            over.add_column(col, justify="right", no_wrap=True)
        for r in raw_rows:
            over.add_row({"reconstruct": "recon"}.get(r["op"], r["op"]), str(r["batch"]), r["backend"],
                          f"{r['p50_us']:.0f}", f"{r['raw_p50_us']:.0f}", f"{r['overhead_us']:+.1f}")
        parts.append(over)
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


