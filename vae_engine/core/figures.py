"""The charts that need only matplotlib: training curves, NLL against time, the detector's scores, the benchmark
chart, and the two helpers every figure uses (`training.plots` draws the figures that need the model itself).
matplotlib is imported with this module: only the commands that draw import it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import atomic  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _show_grid(ax: plt.Axes, grid: np.ndarray, title: str) -> None:
    ax.imshow(np.clip(grid, 0.0, 1.0), cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def training_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss and test -ELBO per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    style = ("o-", "s-") if len(rows) <= 50 else ("-", "-")
    ax.plot(epochs, [r["train_loss"] for r in rows], style[0], label="train loss (-objective)")
    ax.plot(epochs, [r["test_nelbo"] for r in rows], style[1], label="test -ELBO")
    checked = [r for r in rows if "test_nll_k1000" in r]
    if checked:
        ax.plot([r["epoch"] for r in checked], [r["test_nll_k1000"] for r in checked], "^-",
                label="test NLL (k=1000, 1,000 items)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title("Training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def nll_against_time(runs: dict[str, list[dict[str, Any]]], path: Path,
                     targets: dict[str, float] | None = None) -> None:
    """Test NLL (the runs' `test_nll_k1000` checks) against cumulative training time, one line per run (label ->
    metrics rows); `targets` draws labelled horizontal reference lines (e.g. published NLLs)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in runs.items():
        elapsed = np.cumsum([r["seconds"] for r in rows]) / 60.0
        points = [(t, r["test_nll_k1000"]) for t, r in zip(elapsed, rows, strict=True) if "test_nll_k1000" in r]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=3, label=label)
    for name, value in (targets or {}).items():
        ax.axhline(value, ls="--", lw=0.8, color="grey")
        ax.annotate(name, (ax.get_xlim()[0], value), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("training time (minutes; evaluation excluded)")
    ax.set_ylabel("test NLL, nats (k=1000, first 1,000 items)")
    ax.set_title("Test NLL against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def anomaly_chart(scores: np.ndarray, threshold: float, rule: str, labels: np.ndarray | None, path: Path) -> None:
    """Histogram of the normality scores with the threshold marked (split by label when known); with labels, the
    ROC and precision-recall curves of finding the anomalies (low scores)."""
    known = labels is not None and 0 < int(np.sum(labels)) < len(labels)
    fig, axes = plt.subplots(1, 3 if known else 1, figsize=(13 if known else 6, 4), squeeze=False)
    ax = axes[0][0]
    lo, hi = np.percentile(scores, [0.5, 100])
    bins = np.linspace(lo, hi, 60)
    if known:
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal", color="tab:blue")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomaly", color="tab:red")
    else:
        ax.hist(scores, bins=bins, color="tab:blue", alpha=0.8, label="items")
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.2f}")
    ax.set(xlabel=f"score ({rule}; higher = more normal)", ylabel="items", title="scores")
    ax.legend(fontsize=8)
    if known:
        from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

        fpr, tpr, _ = roc_curve(labels, -scores)
        axes[0][1].plot(fpr, tpr, color="tab:red")
        axes[0][1].plot([0, 1], [0, 1], color="0.6", ls=":")
        axes[0][1].set(xlabel="false positive rate", ylabel="true positive rate",
                       title=f"ROC (AUC {roc_auc_score(labels, -scores):.3f})")
        precision, recall, _ = precision_recall_curve(labels, -scores)
        axes[0][2].plot(recall, precision, color="tab:red")
        axes[0][2].axhline(np.mean(labels), color="0.6", ls=":")
        axes[0][2].set(xlabel="recall", ylabel="precision", title="precision-recall")
    fig.tight_layout()
    _save(fig, path)


def bench_chart(report: dict[str, Any], path: Path, order: list[str]) -> None:
    """One panel per operation: throughput against batch size, one fixed colour (and marker) per backend and
    precision across panels, each precision's GEMM peak drawn as the ceiling it sets on that operation
    (peak GFLOP/s / FLOPs per item), the legend outside the data; a last panel with batch-1 p50/p99 latency.
    `order`: the benchmark's path labels in their fixed order (their colours)."""
    rows = report["results"]
    ops = [op for op in ("encode", "decode", "reconstruct") if any(r["op"] == op for r in rows)]
    labels = sorted({r["backend"] for r in rows}, key=lambda b: order.index(b) if b in order else len(order))
    palette = plt.get_cmap("tab20").colors
    style = {b: (palette[(2 * order.index(b)) % 20 if b in order else 19], "osD^v<>ph*"[i % 10])
             for i, b in enumerate(labels)}
    fig, axes = plt.subplots(1, len(ops) + 1, figsize=(4.2 * (len(ops) + 1), 4.4), squeeze=False)
    axes = axes[0]
    peak_style = {"fp32": ":", "bf16": "--", "int8": "-.", "cuda-fp32": ":", "cuda-bf16": "--", "cuda-fp16": "--"}
    for ax, op in zip(axes, ops, strict=False):
        for b in labels:
            pts = sorted((r["batch"], r["samples_per_s"]) for r in rows if r["op"] == op and r["backend"] == b)
            if pts:
                colour, marker = style[b]
                ax.plot(*zip(*pts, strict=True), marker=marker, color=colour, label=b, lw=1.5, ms=4)
        flops = report["flops_per_sample"].get(op)
        for precision, rate in report.get("gemm_peak_best_gflops", {}).items():
            if flops and rate and any(r.get("precision") == precision.removeprefix("cuda-") for r in rows):
                ax.axhline(rate * 1e9 / flops, color="0.35", lw=1, ls=peak_style.get(precision, ":"),
                           label=f"{precision} GEMM peak")
        ax.set(xscale="log", yscale="log", xlabel="batch size", title=op)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("items/s (log)")
    lat = [r for r in rows if r["batch"] == 1 and r["op"] == ("reconstruct" if "reconstruct" in ops else ops[0])]
    ax = axes[-1]
    for j, r in enumerate(lat):
        colour = style[r["backend"]][0]
        ax.bar(j - 0.2, r["p50_us"], width=0.4, color=colour)
        ax.bar(j + 0.2, r["p99_us"], width=0.4, color=colour, alpha=0.45, hatch="//")
    ax.set_xticks(range(len(lat)), [r["backend"] for r in lat], rotation=60, fontsize=7, ha="right")
    ax.set(yscale="log", ylabel="us (log)", title=f"batch-1 {lat[0]['op'] if lat else ''}: p50 | p99 (hatched)")
    ax.grid(alpha=0.3, axis="y")
    handles, names = {}, []
    for a in axes[:-1]:
        for h, n in zip(*a.get_legend_handles_labels(), strict=True):
            if n not in handles:
                handles[n] = h
                names.append(n)
    fig.legend([handles[n] for n in names], names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    machine = report.get("machine", {})
    fig.suptitle(f"{machine.get('cpu', '')}, {machine.get('threads', '?')} threads"
                 + (f"; {machine['gpu']}" if machine.get("gpu") else ""), fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def load_chart(report: dict[str, Any], path: Path) -> None:
    """The server under load (`bench/load_test.py`'s JSON): requests/s and p99 latency against the number of
    concurrent clients, one line per protocol, solid with micro-batching on and dashed with it off, per op."""
    rows = report["rows"]
    ops = sorted({r["op"] for r in rows})
    protocols = sorted({r["protocol"] for r in rows})
    colours = dict(zip(protocols, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(2, len(ops), figsize=(5.5 * len(ops), 7), squeeze=False, sharex=True)
    for col, op in enumerate(ops):
        for protocol in protocols:
            for mode, style in (("batching on", "-"), ("batching off", "--")):
                pts = sorted((r["concurrency"], r["requests_per_s"], r["p99_ms"]) for r in rows
                             if r["op"] == op and r["protocol"] == protocol and r["mode"] == mode)
                if not pts:
                    continue
                c, rps, p99 = zip(*pts, strict=True)
                label = f"{protocol}, {mode}"
                axes[0][col].plot(c, rps, style, marker="o", color=colours[protocol], label=label)
                axes[1][col].plot(c, p99, style, marker="o", color=colours[protocol], label=label)
        axes[0][col].set_title(f"{op}: throughput")
        axes[0][col].set_ylabel("requests/s")
        axes[1][col].set_title(f"{op}: tail latency")
        axes[1][col].set_ylabel("p99 latency (ms)")
        axes[1][col].set_xlabel("concurrent clients")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    _save(fig, path)


def detector_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Anomaly detectors side by side (`bench/detect_bench.py`'s JSON): ROC AUC and average precision of each
    detector (one marker each) on each dataset (one row each)."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    markers = "osD^vP*Xh"
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.32 * len(cases)), sharey=True)
    for ax, metric, title in ((axes[0], "roc_auc", "ROC AUC"), (axes[1], "average_precision", "average precision")):
        for i, det in enumerate(detectors):
            values = [next((r[metric] for r in rows if r["case"] == c and r["detector"] == det), np.nan)
                      for c in cases]
            ax.plot(values, np.arange(len(cases)), markers[i % len(markers)], label=det, alpha=0.85)
        ax.set_yticks(np.arange(len(cases)), cases)
        ax.invert_yaxis()
        ax.set_xlim(0.0, 1.02)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    _save(fig, path)
