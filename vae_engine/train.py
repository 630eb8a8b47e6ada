"""The training loop: in-memory tensors, ELBO or IWAE objective, atomic per-epoch checkpoints, resume."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, data, distributed
from .config import ModelConfig, TrainConfig, from_dict
from .errors import VaeEngineError
from .model import VAE, elbo, iwae_bound, log_weights

TEST_SEED_OFFSET = 7919  # test -ELBO each epoch uses its own fixed stream, the same every epoch


class Callbacks:
    """Hooks the trainer calls; the CLI subclasses it for progress bars (the trainer knows nothing of rich)."""

    def on_train_start(self, epochs: int, start_epoch: int, steps_per_epoch: int) -> None: ...
    def on_batch_end(self, epoch: int, step: int, loss: float, samples: int) -> None: ...
    def on_epoch_end(self, row: dict[str, Any]) -> None: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for one epoch's shuffling, binarization and eps: a function of (seed, epoch) only,
    so a resumed run draws exactly what a straight run would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch (stateless, so resume needs no scheduler state)."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr


def kl_weight_at(cfg: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """KL annealing weight: linear warm-up from 0 to 1 over kl_warmup_epochs."""
    if cfg.kl_warmup_epochs == 0:
        return 1.0
    return min(1.0, (epoch + step / steps) / cfg.kl_warmup_epochs)


class Objective(torch.nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: VAE, objective: str):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: torch.Tensor, eps: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """Mean negative objective over a batch x (B, 784), eps (K, B, D)."""
        if self.objective == "iwae":
            return -iwae_bound(log_weights(self.model, x, eps)).mean()
        return -elbo(self.model, x, eps, kl_weight).mean()


@torch.no_grad()
def test_elbo(model: VAE, x_test: torch.Tensor, cfg: TrainConfig, batch_size: int = 1000) -> float:
    """Mean test -ELBO (one eps sample, analytic KL), with a fixed seed so epochs are comparable."""
    g = torch.Generator().manual_seed(cfg.seed + TEST_SEED_OFFSET)
    model.eval()
    total = 0.0
    for i in range(0, len(x_test), batch_size):
        x = data.binarize(x_test[i : i + batch_size], cfg.binarize, g)
        eps = torch.randn((1, x.shape[0], model.cfg.latent_dim), generator=g)
        total += -elbo(model, x, eps).sum().item()
    model.train()
    return total / len(x_test)


def train(
    model_cfg: ModelConfig | None,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    plots: bool = True,
    download: bool = False,
) -> list[dict[str, Any]]:
    """Train a VAE into `out_dir` (a model directory); with resume=True continue from its last checkpoint.

    On resume the model and training config come from the directory; only `epochs` is taken from train_cfg.
    Returns the per-epoch metrics rows.
    """
    out_dir = Path(out_dir)
    world = distributed.from_env()
    distributed.init(world)
    callbacks = callbacks if callbacks and world.is_main else Callbacks()
    if resume and not (out_dir / checkpoint.CONFIG).exists():
        resume = False  # nothing to resume yet (e.g. the first launch of a torchrun job with --resume): start fresh
    if resume:
        saved = checkpoint.read_config(out_dir)
        if not (out_dir / checkpoint.STATE).is_file():
            raise VaeEngineError(f"{out_dir}: no training state to resume from ({checkpoint.STATE} missing)")
        model_cfg = from_dict(ModelConfig, saved["model"])
        train_cfg = replace(from_dict(TrainConfig, saved["train"]), epochs=train_cfg.epochs)
    elif (out_dir / checkpoint.CONFIG).exists():
        raise VaeEngineError(f"{out_dir} already holds a model: pass --resume to continue it, or choose another --out")
    assert model_cfg is not None
    threads = train_cfg.threads or (max(1, (os.cpu_count() or 1) // world.local_size) if world.size > 1 else None)
    if threads:
        torch.set_num_threads(threads)

    dataset = data.load_dataset(train_cfg.dataset, train_cfg.data_dir, fetch=download)
    x_train = data.to_unit(dataset.train_images[: train_cfg.limit])  # (N, 784) float32, held in memory
    x_test = data.to_unit(dataset.test_images)
    n = len(x_train)
    b, global_batch = train_cfg.batch_size, train_cfg.batch_size * world.size  # --batch-size is per rank
    if global_batch > n:
        raise VaeEngineError(f"batch size {global_batch} is larger than the training set ({n} images)")

    torch.manual_seed(train_cfg.seed)  # parameter init
    model = VAE(model_cfg)
    # the fused CPU kernel: ~0.6 ms per step for the default MLP against ~4 ms for the for-each one
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, fused=True)
    start_epoch, rows = 0, []
    if resume:
        start_epoch = checkpoint.load_state(out_dir, model, optimizer)
        rows = [r for r in checkpoint.read_metrics(out_dir) if r["epoch"] <= start_epoch]
        if start_epoch >= train_cfg.epochs:
            raise VaeEngineError(f"{out_dir} already finished {start_epoch} epochs; pass a larger --epochs to go on")
    world.barrier()  # every rank has checked the directory before the main rank writes into it
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_config(out_dir, model_cfg, train_cfg, {**dataset.describe(), "world_size": world.size})

    objective = Objective(model, train_cfg.objective)
    if world.size > 1:  # averages gradients over ranks: one step on W x b inputs, as one process would take it
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    mine = slice(world.rank * b, (world.rank + 1) * b)  # this rank's share of each global batch
    steps = n // global_batch  # the last partial batch is dropped; each epoch reshuffles
    callbacks.on_train_start(train_cfg.epochs, start_epoch, steps)
    model.train()
    for epoch in range(start_epoch, train_cfg.epochs):
        g = epoch_generator(train_cfg.seed, epoch)  # identical on every rank: same permutation, same noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(train_cfg, epoch)
        t0, total = time.perf_counter(), 0.0
        perm = torch.randperm(n, generator=g)
        for step in range(steps):
            # every rank draws the whole global batch's noise and keeps its slice, so the result does not
            # depend on the world size
            x = data.binarize(x_train[perm[step * global_batch : (step + 1) * global_batch]], train_cfg.binarize, g)
            eps = torch.randn((train_cfg.k, global_batch, model_cfg.latent_dim), generator=g)  # (K, W*b, D)
            loss = objective(x[mine], eps[:, mine], kl_weight_at(train_cfg, epoch, step, steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            total += value
            callbacks.on_batch_end(epoch, step, value, b)
        seconds = time.perf_counter() - t0
        if not math.isfinite(total):
            raise VaeEngineError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower --lr")
        if world.is_main:
            row = {"epoch": epoch + 1, "train_loss": total / steps, "test_nelbo": test_elbo(model, x_test, train_cfg),
                   "seconds": round(seconds, 3), "samples_per_s": round(steps * global_batch / seconds, 1),
                   "lr": lr_at(train_cfg, epoch)}
            rows.append(row)
            # weights, then resume state, then metrics; each atomic, so a kill leaves the last complete epoch
            checkpoint.save_weights(out_dir, model)
            checkpoint.save_state(out_dir, model, optimizer, epoch + 1)
            checkpoint.write_metrics(out_dir, rows)
            callbacks.on_epoch_end(row)
    world.barrier()
    distributed.shutdown(world)
    model.eval()
    if plots and world.is_main:
        from . import plots as plotting

        plotting.training_figures(model, out_dir, rows, x_test, train_cfg.seed)
    return rows
