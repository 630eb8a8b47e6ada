"""Every picture the project draws: training curves, reconstructions, samples, traversals, bench charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import atomic  # noqa: E402
from .config import IMAGE_SHAPE  # noqa: E402


def image_grid(images: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """(N, 784) or (N, 28, 28) values in [0, 1] -> one (rows*29+1, ncols*29+1) image with 1-px separators."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, *IMAGE_SHAPE)
    h, w = IMAGE_SHAPE
    nrows = max(1, -(-len(images) // ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid


def save_grid_png(path: str | Path, images: np.ndarray, ncols: int | None = None) -> None:
    """Write images as a PNG grid (pixel-exact, grayscale, no axes), atomically."""
    ncols = ncols or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = np.clip(image_grid(images, ncols), 0.0, 1.0)
    with atomic.atomic_path(path, ".png") as tmp:
        plt.imsave(tmp, (grid * 255).round().astype(np.uint8), cmap="gray", vmin=0, vmax=255, format="png")


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _show_grid(ax: plt.Axes, grid: np.ndarray, title: str) -> None:
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def training_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss and test -ELBO per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    style = ("o-", "s-") if len(rows) <= 50 else ("-", "-")
    ax.plot(epochs, [r["train_loss"] for r in rows], style[0], label="train loss (-objective)")
    ax.plot(epochs, [r["test_nelbo"] for r in rows], style[1], label="test -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title("Training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


@torch.no_grad()
def training_figures(model: Any, plots: Path, rows: list[dict[str, Any]], x_test: torch.Tensor, seed: int) -> None:
    """The figures of a model directory's plots/ folder, drawn into the folder `plots`."""
    training_curve(rows, plots / "training_curve.png")
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.latent_dim

    # reconstructions: 16 test originals above, the decoded posterior means below
    x = x_test[:16]
    mu, _ = model.encode(x)
    recon = torch.sigmoid(model.decode(mu))
    fig, ax = plt.subplots(figsize=(8, 1.4))
    _show_grid(ax, image_grid(torch.cat([x, recon]).numpy(), 16), "test images (top) and reconstructions (bottom)")
    _save(fig, plots / "reconstructions.png")

    # samples from the prior
    z = torch.randn((64, d), generator=g)
    fig, ax = plt.subplots(figsize=(5, 5))
    _show_grid(ax, image_grid(torch.sigmoid(model.decode(z)).numpy(), 8), "samples: z ~ N(0, I)")
    _save(fig, plots / "samples.png")

    # latent traversal: vary each of the first 8 latent dims over [-3, 3] around a test image's posterior mean
    steps = torch.linspace(-3, 3, 9)
    dims = min(d, 8)
    base = mu[:1].repeat(dims * len(steps), 1)
    for i in range(dims):
        base[i * len(steps) : (i + 1) * len(steps), i] = steps
    fig, ax = plt.subplots(figsize=(5, 0.6 * dims + 0.6))
    _show_grid(ax, image_grid(torch.sigmoid(model.decode(base)).numpy(), len(steps)),
               "latent traversal: row i sets z_i from -3 to 3")
    _save(fig, plots / "latent_traversal.png")

    # interpolation between the posterior means of test images, pairs (0,1), (2,3), ...
    t = torch.linspace(0, 1, 10)[:, None]
    pairs = [(mu[2 * i], mu[2 * i + 1]) for i in range(4)]
    z = torch.cat([(1 - t) * a + t * b for a, b in pairs])
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    _show_grid(ax, image_grid(torch.sigmoid(model.decode(z)).numpy(), 10), "interpolation between test images")
    _save(fig, plots / "interpolation.png")

    if d == 2:  # the decoded manifold: a grid of z through the inverse normal CDF, as in K&W 2013 fig. 4
        n = 20
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.03, 0.97, n))
        zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
        fig, ax = plt.subplots(figsize=(7, 7))
        _show_grid(ax, image_grid(torch.sigmoid(model.decode(zz)).numpy(), n), "decoded 2-D latent manifold")
        _save(fig, plots / "manifold.png")


def bench_chart(report: dict[str, Any], path: Path) -> None:
    """Throughput against batch size per backend, and batch-1 latency percentiles."""
    rows = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["op"], r["backend"]), []).append((r["batch"], r["samples_per_s"]))
    for (op, backend), pts in sorted(series.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{op} / {backend}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("samples/s")
    ax1.set_title("Throughput")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    lat = [r for r in rows if r["batch"] == 1]
    labels = [f"{r['op']}\n{r['backend']}" for r in lat]
    xs = np.arange(len(lat))
    for j, (key, name) in enumerate((("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"))):
        ax2.bar(xs + (j - 1) * 0.27, [r[key] for r in lat], width=0.27, label=name)
    ax2.set_xticks(xs, labels, fontsize=6, rotation=60)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency at batch 1 (us, log scale)")
    ax2.set_title("Batch-1 latency percentiles")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y")
    _save(fig, path)
