"""The figures of a trained model: reconstructions, samples, traversals, the latent space, with the training curve
(`core.figures` has the charts that need no model: curves, the detector's scores, the benchmark chart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..core.figures import _save, _show_grid, nll_against_time, training_curve  # noqa: E402,F401
from ..data.grids import displayable, image_grid, save_grid_png  # noqa: E402,F401 - re-exported
from ..model.engine_priors import kind  # noqa: E402


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
