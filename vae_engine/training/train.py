"""The training loop: in-memory tensors, ELBO or IWAE objective, atomic per-epoch checkpoints, resume."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import data, modeldir
from ..core import rng
from ..core.config import IMAGE_SHAPE, INPUT_DIM, ModelConfig, TrainConfig
from ..core.errors import Interrupted, VaeEngineError
from ..core.hardware import available_cpus, gpu_bf16, gpu_name, native_bf16, resolve_device
from ..model import likelihoods
from ..model.engine_priors import kind
from ..model.estimators import dreg_bound, elbo, iwae_bound, log_weights
from ..model.networks import VAE
from ..perf.fraction import fraction_of, peak_key
from . import distributed, feed
from .callbacks import Callbacks

TEST_SEED = 0  # the test -ELBO of every epoch: evaluate's default seed, so the two report the same estimate
NLL_ITEMS, NLL_K = 1000, 1000  # the --nll-every check: IWAE NLL of the first 1,000 test items, k=1000
PEAK_AFTER_S = 10.0  # the GEMM peak (~2 s to measure) is measured once a run has trained this long


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's counter streams (`rng`): its order of the items (the shuffle stream), and the
    binarization and eps of the item at each position of that order. A function of (seed, epoch) and the position
    only, so a resumed run draws exactly what a straight run would, on any number of ranks and any device."""
    return seed * 1_000_003 + epoch


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


GPU_FP32_WHY = ("these networks use a few percent of a GPU and autocast's casts cost more than bf16 saves "
                "(NVIDIA H200: fp32 faster for every step kind of bench/train_bench.py --speed); --precision bf16 "
                "trains in bf16")


def auto_precision(device: str = "cpu") -> tuple[str, str]:
    """What `--precision auto` trains in on `device`, and why: on a CPU, bf16 autocast where it multiplies bf16
    natively (AVX512_BF16 or AMX; emulated bf16 is slower than fp32), else fp32; on a GPU, fp32. Measured on an
    H200 (bench/results/train_bench.json, "speed cuda"): this trainer's steps (the 500-500 MLP at batch 100 and
    500, k 1 and 5, ELBO/IWAE/DReG, VampPrior; the ResNet at batch 100) ran at 0.4-30% of its fp32 peak (most
    likely bound by kernel launches; not profiled), and bf16 autocast ran 7-21% slower than fp32 in every one."""
    if device.startswith("cuda"):
        return "fp32", GPU_FP32_WHY if gpu_bf16() else "this GPU has no native bf16"
    return ("bf16", "this CPU has native bf16") if native_bf16() else ("fp32", "this CPU has no native bf16")


class Objective(torch.nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel can wrap it. In bf16 the networks run
    under autocast; their outputs, every log-density, the log-sum-exp and the optimizer stay fp32."""

    def __init__(self, model: VAE, objective: str, precision: str = "fp32"):
        super().__init__()
        self.model, self.objective, self.bf16 = model, objective, precision == "bf16"

    def forward(self, x: torch.Tensor, eps: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """Mean negative objective over a batch x (B, D), eps (B, K, L)."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.objective == "dreg":
                return -dreg_bound(self.model, x, eps).mean()
            if self.objective == "iwae":
                return -iwae_bound(log_weights(self.model, x, eps)).mean()
            return -elbo(self.model, x, eps, kl_weight).mean()


def step_flops(cfg: ModelConfig, batch: int, k: int) -> float:
    """FLOPs of one training step (2 per multiply-add): the forward pass is the encoder on the batch (and on a
    VampPrior's pseudo-inputs) plus the decoder on its k samples; the backward pass is counted as twice the forward
    (a gradient for the inputs and one for the weights of each layer), the usual 3x."""
    from ..perf.work import model_flops

    per_item = model_flops(cfg)
    items = batch + kind(cfg).encoder_rows(cfg)
    return 3.0 * (items * per_item["encode"] + k * batch * per_item["decode"])


def auto_likelihood(dataset: data.Dataset) -> tuple[str, str]:
    """The likelihood `--likelihood auto` stands for on this data, and why (recorded in config.json).

    - an IDX dataset (the bundled MNIST, --dataset, --data-dir): bernoulli, dynamically binarized, the convention
      its published NLLs use (Burda et al. 2015);
    - any other data bounded in [0, 1] (uint8 intensities / 255 or floats; flat or image-shaped): the continuous
      Bernoulli (Loaiza-Ganem & Cunningham 2019), the proper likelihood of [0, 1] intensities;
    - anything else: gaussian (inputs standardized per feature inside the model).
    """
    x = dataset.train_images
    if dataset.name != "file" and x.dtype == np.uint8:
        return "bernoulli", "IDX images: Bernoulli on dynamically binarized pixels (the MNIST benchmark convention)"
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if x.dtype == np.uint8:
        return "continuous-bernoulli", "uint8 values, read as intensities in [0, 1]"
    if lo >= 0.0 and hi <= 1.0:
        return "continuous-bernoulli", f"every value lies in [0, 1] ({lo:g}..{hi:g})"
    return "gaussian", f"values span {lo:g}..{hi:g}, outside [0, 1]"


def resolve_model(model_cfg: ModelConfig, dataset: data.Dataset) -> tuple[ModelConfig, str | None]:
    """The model config for this data (its item shape, and the likelihood `auto` stands for) and, for auto, why
    that likelihood. Gaussian models standardize their inputs per feature."""
    likelihood, why = model_cfg.likelihood, None
    if likelihood == "auto":
        likelihood, why = auto_likelihood(dataset)
    shape = dataset.item_shape
    if model_cfg.input_shape == (INPUT_DIM,) and shape == (1, *IMAGE_SHAPE) and model_cfg.arch == "mlp":
        shape = (INPUT_DIM,)  # MNIST-shaped MLPs keep the flat spec older folders have
    return replace(model_cfg, input_shape=shape, likelihood=likelihood, standardize=likelihood == "gaussian"), why


@torch.no_grad()
def test_elbo(model: VAE, x_test: torch.Tensor, cfg: TrainConfig, batch_size: int = 1000) -> float:
    """Mean test -ELBO with the counter-based streams of seed 0 (binarization and eps keyed by test index): the
    same estimator and numbers as `vae-engine evaluate` at its default seed, and the same every epoch."""
    from ..model.estimators import reference_nelbo

    model.eval()
    x_all, binarized = x_test.numpy(), model.likelihood.binarizes(cfg.binarize)
    total = 0.0
    for i in range(0, len(x_all), batch_size):
        x = rng.binarize(x_all[i : i + batch_size], TEST_SEED, i) if binarized else x_all[i : i + batch_size]
        total += float(reference_nelbo(model, x, i, TEST_SEED).sum())
    model.train()
    return total / len(x_all)


@torch.no_grad()
def test_nll(model: VAE, x_test: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean IWAE NLL (k=NLL_K) of the first NLL_ITEMS test items, seed-0 streams: the `evaluate --k 1000 --limit
    1000` number, cheap enough to track during a run (the NLL-against-time curve of a recipe)."""
    from ..model.estimators import evaluate, reference_scores

    model.eval()
    x = x_test[:NLL_ITEMS].numpy()
    nll = evaluate(lambda xb, start, k, seed: reference_scores(model, xb, start, k, seed), x, NLL_K, TEST_SEED,
                   binarize=model.likelihood.binarizes(cfg.binarize))[1]
    model.train()
    return float(nll.mean())


def train(
    model_cfg: ModelConfig | None,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    plots: bool = True,
    download: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Train a VAE into `out_dir` (a model directory); with resume=True continue from its last checkpoint.

    `device` (cpu, cuda, cuda:N, auto) is where the networks, the batches and the optimizer live; shuffling,
    binarization and eps are still drawn on the CPU from the epoch's generator and copied over, so a run draws the
    same noise on any device (and a run started on a GPU can be resumed on the CPU, or the other way round).

    On resume the model and training config come from the directory; only `epochs` is taken from train_cfg.
    Every state a killed run can leave is either resumable or restartable: a folder without a checkpoint
    (killed in epoch 1, diverged, disk full) restarts from scratch, with its saved config under --resume.
    `overwrite=True` deletes a previous model in the folder and starts again. Returns the per-epoch metrics rows.
    """
    out_dir = Path(out_dir)
    world = distributed.from_env()
    device = resolve_device(device)
    if device == "cuda" and world.size > 1:
        device = f"cuda:{world.local_rank}"  # one GPU per process under torchrun
    distributed.init(world, device)
    existed = out_dir.exists()
    try:
        # only the main rank writes, so only it locks; the others read the folder under its lock
        with modeldir.lock(out_dir) if world.is_main else contextlib.nullcontext():
            return _train(model_cfg, train_cfg, out_dir, resume, callbacks, plots, download, overwrite, world,
                          torch.device(device))
    except BaseException:
        if world.is_main and not existed and not (out_dir / modeldir.STATE).exists():
            _remove_run(out_dir)  # nothing worth keeping: leave no half-made folder behind
        raise


def _remove_run(out_dir: Path) -> None:
    """Delete what a run writes into a model folder (and the folder itself if that leaves it empty)."""
    for name in (*modeldir.INFERENCE_FILES, modeldir.STATE, modeldir.METRICS, modeldir.EVALUATION,
                 modeldir.EXPORT_REPORT, *(path.name for path in _graph_files(out_dir))):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / modeldir.PLOTS, ignore_errors=True)
    with contextlib.suppress(OSError):
        out_dir.rmdir()


def _graph_files(out_dir: Path) -> list[Path]:
    from ..modeldir.graphs import ROLES, VARIANTS, graph_path

    return [graph_path(out_dir, role, variant) for role in ROLES for variant in VARIANTS]


def _train(model_cfg, train_cfg, out_dir: Path, resume, callbacks, plots, download, overwrite, world, device):
    callbacks = callbacks if callbacks and world.is_main else Callbacks()
    model_cfg, train_cfg, resume = _prepare_out(model_cfg, train_cfg, out_dir, resume, overwrite, world, callbacks)
    threads = train_cfg.threads or max(1, available_cpus() // world.local_size)
    torch.set_num_threads(threads)
    dataset, model_cfg, train_cfg, reasons = _data(model_cfg, train_cfg, out_dir, resume, download, device)
    x_train = data.to_unit(dataset.train_images[: train_cfg.limit])  # (N, D) float32, held in memory
    x_test = data.to_unit(dataset.test_images)
    _check_items(dataset, model_cfg, x_train, x_test)
    n, global_batch = len(x_train), train_cfg.batch_size * world.size  # --batch-size is per rank
    if global_batch > n:
        raise VaeEngineError(f"batch size {global_batch} is larger than the training set ({n} items); "
                             "pass a smaller --batch-size")

    torch.manual_seed(train_cfg.seed)  # parameter init
    model = VAE(model_cfg)
    if model_cfg.standardize:  # measured on the training split; stored as buffers, so every graph carries them
        model.set_standardization(x_train.mean(0), x_train.std(0))
    model.init_pseudo_inputs(x_train, torch.Generator().manual_seed(2**63 + train_cfg.seed))  # VampPrior only
    model.to(device)  # before the optimizer, so its moments live beside the weights
    # the fused CPU kernel: ~0.6 ms per step for the default MLP against ~4 ms for the for-each one
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, fused=True)
    start_epoch, rows = 0, []
    if resume:
        start_epoch, rows = modeldir.load_state(out_dir, model, optimizer)
        if start_epoch >= train_cfg.epochs:
            if plots and world.is_main and not (out_dir / modeldir.PLOTS).is_dir():
                modeldir.write_metrics(out_dir, rows)
                # killed while drawing its plots: draw them now
                _draw_plots(model.cpu().eval(), out_dir, rows, x_test, train_cfg.seed, dataset.test_labels)
                callbacks.on_message(f"{out_dir} had finished {start_epoch} epochs; drew its missing plots")
                return rows
            raise VaeEngineError(f"{out_dir} already finished {start_epoch} epochs; pass a larger --epochs to go on")
    world.barrier()  # every rank has checked the directory before the main rank writes into it
    if world.is_main:
        _write_config(out_dir, model_cfg, train_cfg, dataset, world, resume, reasons)
        modeldir.write_metrics(out_dir, rows)  # the checkpoint's rows: a kill may have cut the file short
    loop = _Loop(model, optimizer, train_cfg, world, device, callbacks, out_dir, x_train, x_test, threads)
    loop.run(start_epoch, rows)
    world.barrier()
    distributed.shutdown(world)
    model.cpu().eval()
    if plots and world.is_main:
        _draw_plots(model, out_dir, rows, x_test, train_cfg.seed, dataset.test_labels)
    return rows


def _prepare_out(model_cfg, train_cfg, out_dir: Path, resume: bool, overwrite: bool, world, callbacks):
    """What --resume and --overwrite make of the output folder: (model config, train config, resume), the saved
    configs where a run is resumed; an error where a model is there and neither was asked for."""
    has_config, has_state = (out_dir / modeldir.CONFIG).exists(), (out_dir / modeldir.STATE).exists()
    if resume and has_config:
        model_cfg = modeldir.model_config(out_dir)
        train_cfg = replace(modeldir.train_config(out_dir), epochs=train_cfg.epochs)
        if not has_state:  # interrupted before its first checkpoint: start it again with the saved config
            callbacks.on_message(f"{out_dir} has no checkpoint yet: starting its run again from epoch 1")
            resume = False
    elif resume:
        resume = False  # nothing to resume yet (e.g. the first launch of a torchrun job with --resume): start fresh
    elif has_state and not overwrite:
        raise VaeEngineError(f"{out_dir} already holds a model: pass --resume to continue it, --overwrite to "
                             "start again, or choose another --out")
    elif overwrite and world.is_main:
        _remove_run(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    assert model_cfg is not None
    return model_cfg, train_cfg, resume


def _data(model_cfg, train_cfg, out_dir: Path, resume: bool, download: bool, device):
    """The training data, and what `auto` settings become for it: (dataset, model config, train config,
    {config key: why auto chose it}). A resumed run keeps its settings and must get items of its shape."""
    dataset = data.load_training_data(train_cfg, fetch=download)
    reasons = {}
    if not resume:
        model_cfg, why = resolve_model(model_cfg, dataset)
        if why:
            reasons["likelihood_auto"] = f"{model_cfg.likelihood}: {why}"
        if train_cfg.precision == "auto":
            chosen, reason = auto_precision(device.type)
            train_cfg, reasons["precision_auto"] = replace(train_cfg, precision=chosen), f"{chosen}: {reason}"
    elif dataset.item_shape != model_cfg.input_shape and math.prod(dataset.item_shape) != model_cfg.input_dim:
        raise VaeEngineError(f"{out_dir}: the model takes items of shape {list(model_cfg.input_shape)}, the data "
                             f"has {list(dataset.item_shape)}")
    return dataset, model_cfg, train_cfg, reasons


def _check_items(dataset, model_cfg, x_train: torch.Tensor, x_test: torch.Tensor) -> None:
    """Finite values, and values in [0, 1] for a likelihood of the unit interval, in both splits."""
    lk = likelihoods.get(model_cfg.likelihood)
    for name, x in (("training", x_train), ("test", x_test)):
        if not torch.isfinite(x).all():
            raise VaeEngineError(f"{dataset.source}: the {name} data holds NaN or Inf values; clean it first")
        if lk.unit_interval and (x.min() < 0 or x.max() > 1):
            raise VaeEngineError(f"{dataset.source}: the {lk.name} likelihood needs values in [0, 1], the {name} "
                                 f"data spans {float(x.min()):g}..{float(x.max()):g}; use --likelihood gaussian")


def _write_config(out_dir: Path, model_cfg, train_cfg, dataset, world, resume: bool, reasons: dict) -> None:
    """config.json, with why `auto` chose the likelihood and the precision (a resumed run keeps what its first
    run recorded)."""
    described = {**dataset.describe(), "world_size": world.size}
    first = modeldir.read_config(out_dir).get("data", {}) if resume else {}
    for key in ("likelihood_auto", "precision_auto"):
        if reasons.get(key) or first.get(key):
            described[key] = reasons.get(key) or first[key]
    modeldir.write_config(out_dir, model_cfg, train_cfg, described)


class _Loop:
    """The epochs of one run: each epoch's steps (`epoch`), then its row of metrics and its checkpoint
    (`record`), on the main rank."""

    def __init__(self, model, optimizer, train_cfg, world, device, callbacks, out_dir, x_train, x_test, threads):
        self.model, self.optimizer, self.cfg, self.world, self.device = model, optimizer, train_cfg, world, device
        self.callbacks, self.out_dir, self.x_test, self.threads = callbacks, out_dir, x_test, threads
        self.n, self.b, self.global_batch = len(x_train), train_cfg.batch_size, train_cfg.batch_size * world.size
        self.steps = self.n // self.global_batch  # the last partial batch is dropped; each epoch reshuffles
        self.objective = Objective(model, train_cfg.objective, train_cfg.precision)
        if world.size > 1:  # averages gradients over ranks: one step on W x b inputs, as one process would take it
            self.objective = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device.index or 0] if device.type == "cuda" else None)
        binarize = model.likelihood.binarizes(train_cfg.binarize)  # dynamic binarization: re-drawn every epoch
        self.batches = feed.Feed(x_train, self.b, train_cfg.k, model.cfg.latent_dim, binarize, device,
                                 processes=world.local_size)
        self.flops = step_flops(model.cfg, self.global_batch, train_cfg.k) * self.steps
        self.peak, self.trained_s, self.every = None, 0.0, feed.sync_every(device)
        self.where = "cpu" if device.type == "cpu" else f"{device} ({gpu_name()})"

    def run(self, start_epoch: int, rows: list[dict[str, Any]]) -> None:
        """Epochs start_epoch..epochs-1, appending a row to `rows` after each; an interrupt keeps the last
        checkpoint and says how to go on."""
        self.callbacks.on_train_start(self.cfg.epochs, start_epoch, self.steps)
        self.model.train()
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, self.cfg.epochs):
                total, seconds = self.epoch(epoch)
                if self.world.is_main:
                    self.record(epoch, total, seconds, rows)
        except KeyboardInterrupt:
            done = len(rows)
            if done:
                raise Interrupted(f"stopped in epoch {epoch + 1}: the checkpoint after epoch {done} is kept in "
                                  f"{self.out_dir}; continue with `vae-engine train --out {self.out_dir} --resume "
                                  f"--epochs {self.cfg.epochs}`") from None
            raise Interrupted(f"stopped in epoch {epoch + 1}, before any checkpoint; nothing was kept") from None
        finally:
            self.batches.close()

    def epoch(self, epoch: int) -> tuple[float, float]:
        """One epoch's steps: (summed loss, seconds). Losses are read back every `feed.sync_every` steps (every
        step on the CPU), and a non-finite one stops the run before its window's last step reaches the weights."""
        cfg, steps = self.cfg, self.steps
        es = epoch_seed(cfg.seed, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        t0, total, pending = time.perf_counter(), 0.0, []
        perm = torch.from_numpy(rng.permutation(es, self.n))  # the same on every rank
        # this rank's items are positions first..first+b-1 of the epoch's order; their noise is keyed by those
        # positions (the engine's counter streams), so it does not depend on the world size or the device
        firsts = (step * self.global_batch + self.world.rank * self.b for step in range(steps))
        for step, (x, eps) in enumerate(self.batches.batches(es, perm, firsts)):
            loss = self.objective(x, eps, kl_weight_at(cfg, epoch, step, steps))
            pending.append(loss.detach())
            if len(pending) == self.every or step == steps - 1:  # a read-back: every step on the CPU
                for i, value in enumerate(torch.stack(pending).tolist(), start=step + 1 - len(pending)):
                    if not math.isfinite(value):
                        kept = (f"the checkpoint after epoch {epoch} is kept; " if epoch else "")
                        raise VaeEngineError(f"training diverged in epoch {epoch + 1} (loss is not finite); "
                                             f"{kept}start again with a lower --lr (add --overwrite to reuse "
                                             "this --out)")
                    total += value
                    self.callbacks.on_batch_end(epoch, i, value, self.b)
                pending = []
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the epoch's time includes its queued steps
        return total, time.perf_counter() - t0

    def record(self, epoch: int, total: float, seconds: float, rows: list[dict[str, Any]]) -> None:
        """The epoch's row (losses, speed against the machine's peak, the test NLL when due), then the weights,
        the resume state (which carries the rows) and metrics.jsonl; each atomic, and a resume rewrites
        metrics.jsonl from the state, so a kill between them loses nothing."""
        cfg, model = self.cfg, self.model
        self.trained_s += seconds
        if self.peak is None and self.trained_s >= PEAK_AFTER_S and self.world.size == 1:
            from ..perf.peaks import measured_peaks

            self.peak = measured_peaks(self.threads).get(peak_key(cfg.precision, self.device.type))  # as bench
        gflops = self.flops / seconds / 1e9
        row = {"epoch": epoch + 1, "train_loss": total / self.steps,
               "test_nelbo": test_elbo(model, self.x_test, cfg), "seconds": round(seconds, 3),
               "samples_per_s": round(self.steps * self.global_batch / seconds, 1), "lr": lr_at(cfg, epoch),
               "precision": cfg.precision, "device": self.where, "gflops": round(gflops, 2),
               "peak_gflops": round(self.peak, 1) if self.peak else None,
               "fraction_of_peak": fraction_of(gflops, self.peak)}
        if cfg.nll_every and ((epoch + 1) % cfg.nll_every == 0 or epoch + 1 == cfg.epochs):
            row["test_nll_k1000"] = test_nll(model, self.x_test, cfg)
        rows.append(row)
        modeldir.save_weights(self.out_dir, model)
        modeldir.save_state(self.out_dir, model, self.optimizer, epoch + 1, rows)
        modeldir.write_metrics(self.out_dir, rows)
        self.callbacks.on_epoch_end(row)


def _draw_plots(model: VAE, out_dir: Path, rows: list[dict[str, Any]], x_test: torch.Tensor, seed: int,
                labels=None) -> None:
    """Draw plots/ into a scratch folder and swap it in whole: a kill mid-way leaves no partial plots/."""
    from ..core import atomic
    from . import plots as plotting

    with atomic.temp_dir(out_dir, modeldir.PLOTS) as staging:
        plotting.training_figures(model, staging, rows, x_test, seed, labels)
        atomic.replace_dir(staging, out_dir / modeldir.PLOTS)
