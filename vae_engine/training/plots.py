"""Every picture the project draws: training curves, reconstructions, samples, traversals, bench charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..core import atomic  # noqa: E402
from ..data.grids import displayable, image_grid, save_grid_png  # noqa: E402,F401 - re-exported
from ..model.engine_priors import kind  # noqa: E402


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


@torch.no_grad()
def training_figures(model: Any, plots: Path, rows: list[dict[str, Any]], x_test: torch.Tensor, seed: int,
                     labels: np.ndarray | None = None) -> None:
    """The figures of a model directory's plots/ folder, drawn into the folder `plots`: the training curve, then
    image figures for image models, feature and latent views for tabular ones."""
    training_curve(rows, plots / "training_curve.png")
    if model.cfg.image_shape is not None:
        _image_figures(model, plots, x_test, seed)
    else:
        _table_figures(model, plots, x_test, labels)


def _image_figures(model: Any, plots: Path, x_test: torch.Tensor, seed: int) -> None:
    d, shape = model.cfg.latent_dim, model.cfg.image_shape
    mean = model.likelihood.mean_torch

    def grid(values: torch.Tensor, ncols: int) -> np.ndarray:
        return image_grid(displayable(values.numpy()), ncols, shape)

    # reconstructions: 16 test originals above, the decoded posterior means below
    x = x_test[:16]
    mu, _ = model.encode(x)
    fig, ax = plt.subplots(figsize=(8, 1.4))
    _show_grid(ax, grid(torch.cat([x, mean(model.decode(mu))]), len(x)),
               "test items (top) and reconstructions (bottom)")
    _save(fig, plots / "reconstructions.png")

    # samples from the prior: items 0..63 of seed's streams, what `vae-engine sample -n 64 --seed SEED` decodes
    z = model.prior.sample(64, d, seed)
    fig, ax = plt.subplots(figsize=(5, 5))
    _show_grid(ax, grid(mean(model.decode(z)), 8), "samples: z ~ " + kind(model.cfg).label)
    _save(fig, plots / "samples.png")

    # latent traversal: vary each of the first 8 latent dims over [-3, 3] around a test item's posterior mean
    steps = torch.linspace(-3, 3, 9)
    dims = min(d, 8)
    base = mu[:1].repeat(dims * len(steps), 1)
    for i in range(dims):
        base[i * len(steps) : (i + 1) * len(steps), i] = steps
    fig, ax = plt.subplots(figsize=(5, 0.6 * dims + 0.6))
    _show_grid(ax, grid(mean(model.decode(base)), len(steps)), "latent traversal: z_i from -3 to 3")
    ax.axis("on")
    ax.set_xticks([])
    cell = ax.get_ylim()[0] / dims
    ax.set_yticks([cell * (i + 0.5) for i in range(dims)], [f"z_{i}" for i in range(dims)], fontsize=7)
    _save(fig, plots / "latent_traversal.png")

    # interpolation between the posterior means of test items, pairs (0,1), (2,3), ...
    pairs = [(mu[2 * i], mu[2 * i + 1]) for i in range(min(4, len(mu) // 2))]
    if pairs:
        t = torch.linspace(0, 1, 10)[:, None]
        z = torch.cat([(1 - t) * a + t * b for a, b in pairs])
        fig, ax = plt.subplots(figsize=(5.5, 2.6))
        _show_grid(ax, grid(mean(model.decode(z)), 10), "interpolation between test items")
        _save(fig, plots / "interpolation.png")

    if d == 2:  # the decoded manifold: a grid of z through the inverse normal CDF, as in K&W 2013 fig. 4
        n = 20
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.03, 0.97, n))
        zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
        fig, ax = plt.subplots(figsize=(7, 7))
        _show_grid(ax, grid(mean(model.decode(zz)), n), "decoded 2-D latent manifold")
        _save(fig, plots / "manifold.png")


def _table_figures(model: Any, plots: Path, x_test: torch.Tensor, labels: np.ndarray | None) -> None:
    """features.png: each feature's reconstruction against its value (up to 16 features, test set);
    latent.png: the test set's posterior means on the first two latent dimensions, coloured by label if known."""
    x = x_test[:2000]
    mu, _ = model.encode(x)
    recon = model.likelihood.mean_torch(model.decode(mu)).numpy()
    xs = x.numpy()
    n = min(16, xs.shape[1])
    cols = min(4, n)
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(2.6 * cols, 2.4 * rows_), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.scatter(xs[:, i], recon[:, i], s=4, alpha=0.5)
        lo, hi = float(min(xs[:, i].min(), recon[:, i].min())), float(max(xs[:, i].max(), recon[:, i].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"feature {i}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("test set: reconstruction (y) against value (x), first features")
    fig.tight_layout()
    _save(fig, plots / "features.png")

    m = mu.numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    second = m[:, 1] if m.shape[1] > 1 else np.zeros(len(m))
    if labels is not None and len(labels) >= len(m):
        points = ax.scatter(m[:, 0], second, c=np.asarray(labels[: len(m)], np.float64), s=5, cmap="tab10")
        fig.colorbar(points, ax=ax, label="label")
    else:
        ax.scatter(m[:, 0], second, s=5)
    ax.set_xlabel("z_0 (posterior mean)")
    ax.set_ylabel("z_1 (posterior mean)")
    ax.set_title("test set in latent space")
    _save(fig, plots / "latent.png")


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
