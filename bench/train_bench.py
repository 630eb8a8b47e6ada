"""Training per precision: how fast (samples/s, GFLOP/s and % of this machine's GEMM peak for that precision, on the
trainer's own step) and how good (the test NLL that fp32 and bf16 autocast training reach at equal epochs).

    python bench/train_bench.py --speed                    # ~2 min: every step kind below, fp32 and bf16
    python bench/train_bench.py --parity --epochs 10       # trains 2 precisions x 2 seeds, then scores each
    python bench/train_bench.py --ablation --epochs 20     # the recipe, then the recipe less one ingredient each

Speed: one step is the trainer's (`train.Objective` forward, backward, fused Adam) on bundled-MNIST batches,
dynamically binarized; warmed up, then timed for --seconds, threads set explicitly; the GEMM peaks are measured in
the same run (`peaks.measured_peaks`, the numbers `vae-engine bench` compares with). FLOPs per step:
`train.step_flops` (forward multiply-adds x 2 x 3 for the backward pass).
Parity: `train.train` on the 60,000 training images, then the IWAE NLL (k=1000) of the first 1,000 test images with
the fp32 PyTorch reference (seed 0 streams, the same for every model). The seed-to-seed spread within a precision
is the noise a bf16-fp32 difference is judged against; the per-image paired difference gives its standard error.
Ablation: the README recipe (VampPrior, DReG k=5, bf16, batch 500, cosine lr) and variants that each change one
ingredient, trained for the same epochs; each row has its training seconds and the test NLL the trainer's
`--nll-every` check measures (k=1000, first 1,000 test images, fp32 reference, seed-0 streams).
Results: bench/results/train_bench.json (merged with what is there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from vae_engine import data
from vae_engine.core import hardware, rng
from vae_engine.core.config import ModelConfig, TrainConfig
from vae_engine.model.estimators import evaluate, reference_scores
from vae_engine.model.networks import VAE
from vae_engine.perf.fraction import fraction_of, peak_key, percent
from vae_engine.perf.peaks import measured_peaks
from vae_engine.training.feed import Feed, sync_every
from vae_engine.training.train import Objective, step_flops, train

RESULTS = Path(__file__).parent / "results" / "train_bench.json"
NETWORK = {"latent_dim": 50, "hidden": (500, 500)}  # the shipped model's network
# (name, objective, k, batch, prior, arch)
STEPS = [("elbo k=1 b=100", "elbo", 1, 100, "normal", "mlp"), ("elbo k=1 b=500", "elbo", 1, 500, "normal", "mlp"),
         ("iwae k=5 b=500", "iwae", 5, 500, "normal", "mlp"), ("dreg k=5 b=500", "dreg", 5, 500, "normal", "mlp"),
         ("dreg k=5 b=500 vamp", "dreg", 5, 500, "vamp", "mlp"),
         ("resnet dreg k=5 b=100", "dreg", 5, 100, "normal", "resnet")]


def _trainer_step(cfg: ModelConfig, objective: str, precision: str, x_train: torch.Tensor, batch: int, k: int,
                  device: torch.device):
    """One training step of a fresh seeded model, as the trainer takes it: its feed (the counter streams' batch,
    made in line on the CPU and by worker threads ahead of the GPU), the loss, backward, fused Adam, and the loss
    read back as often as the trainer reads it. Returns (step, finish): finish waits for queued device work."""
    torch.manual_seed(0)
    model = VAE(cfg)
    model.init_pseudo_inputs(x_train, torch.Generator().manual_seed(1))
    model.to(device)
    loss_fn = Objective(model, objective, precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    order = torch.from_numpy(rng.permutation(0, len(x_train)))  # one shuffle, as the trainer's epoch has
    feed = Feed(x_train, batch, k, cfg.latent_dim, True, device)
    batches = feed.batches(0, order, itertools.cycle(range(0, len(x_train) - batch + 1, batch)))
    every, taken = sync_every(device), [0]

    def step():
        x, eps = next(batches)
        loss = loss_fn(x, eps, 1.0)
        taken[0] += 1
        if taken[0] % every == 0:
            loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def finish():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step, finish


def speed(threads: int, seconds: float, device: torch.device) -> list[dict]:
    """samples/s, GFLOP/s and fraction of peak of each step kind in fp32 and bf16."""
    torch.set_num_threads(threads)
    x_train = data.to_unit(data.load_training_data(TrainConfig()).train_images)
    peaks = measured_peaks(threads)
    key = partial(peak_key, device=device.type)
    rows = []
    for name, objective, k, batch, prior, arch in STEPS:
        cfg = ModelConfig(**NETWORK, prior=prior, arch=arch)
        for precision in ("fp32", "bf16"):
            step, finish = _trainer_step(cfg, objective, precision, x_train, batch, k, device)
            for _ in range(5):  # warm-up: allocator, oneDNN kernels
                step()
            finish()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                step()
                n += 1
            finish()
            elapsed = time.perf_counter() - t0
            gflops = step_flops(cfg, batch, k) * n / elapsed / 1e9
            peak = peaks[key(precision)]
            rows.append({"step": name, "precision": key(precision), "samples_per_s": round(n * batch / elapsed, 1),
                         "gflops": round(gflops, 1), "peak_gflops": round(peak, 1),
                         "fraction_of_peak": fraction_of(gflops, peak)})
            print(f"{name:22s} {key(precision):10s} {rows[-1]['samples_per_s']:10,.0f} samples/s  {gflops:7.1f} "
                  f"GFLOP/s  {percent(fraction_of(gflops, peak)):>5s} of {peak:.0f}", flush=True)
    return rows


def prior_cost(threads: int, k: int = 1000, n: int = 64, components: int = 500) -> dict:
    """What a VampPrior adds to scoring: `Engine.log_likelihood` (k samples of n items) of one network with N(0, I)
    and with a `components`-Gaussian mixture prior (random weights, torch backend, same eps), and the mixture
    kernel alone on one block of decoder rows."""
    from vae_engine import modeldir
    from vae_engine.core.config import SCORE_ROWS
    from vae_engine.perf.timing import measure
    from vae_engine.runtime.engine import Engine

    torch.set_num_threads(threads)
    x = (np.random.default_rng(0).random((n, 784)) < 0.2).astype(np.float32)
    out: dict = {"k": k, "items": n, "components": components}
    with tempfile.TemporaryDirectory() as tmp:
        for prior in ("normal", "vamp"):
            cfg = ModelConfig(**NETWORK, prior=prior, pseudo_inputs=components)
            folder = Path(tmp) / prior
            folder.mkdir()
            torch.manual_seed(0)
            model = VAE(cfg)
            modeldir.write_config(folder, cfg, TrainConfig(), {})
            modeldir.save_weights(folder, model)
            engine = Engine.load(folder, backend="torch", threads=threads)
            t = measure(lambda e=engine: e.log_likelihood(x, k=k), min_time=2.0, warmup=1, min_repeats=3)
            out[f"{prior}_seconds"] = float(np.median(t.seconds))
        z = np.random.default_rng(1).standard_normal((SCORE_ROWS, NETWORK["latent_dim"])).astype(np.float32)
        mixture = modeldir.load_prior(Path(tmp) / "vamp", cfg)
        t = measure(lambda: mixture.log_prob(z), min_time=1.0, warmup=1, min_repeats=3)
        out["mixture_kernel_us_per_row"] = float(np.median(t.seconds)) / SCORE_ROWS * 1e6
    out["extra_fraction"] = out["vamp_seconds"] / out["normal_seconds"] - 1.0
    out["extra_us_per_sample"] = (out["vamp_seconds"] - out["normal_seconds"]) / (k * n) * 1e6
    print(json.dumps(out), flush=True)
    return out


RECIPE = {"prior": "vamp", "arch": "mlp", "objective": "dreg", "k": 5, "precision": "bf16"}
ABLATIONS = {"recipe": {}, "iwae gradients (not DReG)": {"objective": "iwae"}, "normal prior": {"prior": "normal"},
             "k=1 ELBO": {"objective": "elbo", "k": 1}, "fp32": {"precision": "fp32"},
             "resnet conv": {"arch": "resnet"}}


def ablation(threads: int, epochs: int, names: list[str], device: torch.device) -> list[dict]:
    """Train the recipe and each named variant for `epochs` (seed 0, 60,000 images), one row each."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            v = {**RECIPE, **ABLATIONS[name]}
            model_cfg = ModelConfig(**NETWORK, prior=v["prior"], pseudo_inputs=500, arch=v["arch"])
            train_cfg = TrainConfig(epochs=epochs, batch_size=500, lr=1e-3, lr_schedule="cosine",
                                    objective=v["objective"], k=v["k"], seed=0, threads=threads,
                                    precision=v["precision"], nll_every=epochs)
            metrics = train(model_cfg, train_cfg, Path(tmp) / str(len(rows)), plots=False, device=str(device))
            rows.append({"variant": name, **v, "epochs": epochs,
                         "train_seconds": round(sum(r["seconds"] for r in metrics), 1),
                         "samples_per_s": round(float(np.median([r["samples_per_s"] for r in metrics])), 1),
                         "test_nelbo": metrics[-1]["test_nelbo"], "test_nll_k1000": metrics[-1]["test_nll_k1000"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def parity(threads: int, epochs: int, objective: str, k: int, batch: int, seeds: tuple[int, ...],
           device: torch.device) -> dict:
    """Train each precision with each seed for `epochs`, then score every model on the same 1,000 test images."""
    test = data.load_test_data(TrainConfig())[0][:1000]
    nll: dict[tuple[str, int], np.ndarray] = {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                out = Path(tmp) / f"{precision}-{seed}"
                t0 = time.perf_counter()
                rows = train(ModelConfig(**NETWORK), TrainConfig(epochs=epochs, batch_size=batch, objective=objective,
                                                                  k=k, seed=seed, threads=threads,
                                                                  precision=precision), out, plots=False,
                             device=str(device))
                train_s = sum(r["seconds"] for r in rows)
                from vae_engine import modeldir

                model = modeldir.load_model(out).to(device)
                nll[precision, seed] = evaluate(partial(reference_scores, model), test, 1000, 0)[1]
                runs.append({"precision": precision, "seed": seed, "train_seconds": round(train_s, 1),
                             "wall_seconds": round(time.perf_counter() - t0, 1),
                             "test_nelbo_last_epoch": rows[-1]["test_nelbo"],
                             "test_nll_k1000": float(nll[precision, seed].mean())})
                print(json.dumps(runs[-1]), flush=True)
    diffs = [nll["bf16", s] - nll["fp32", s] for s in seeds]  # per image, paired by seed
    mean = {p: float(np.mean([nll[p, s].mean() for s in seeds])) for p in ("fp32", "bf16")}
    spread = {p: float(np.ptp([nll[p, s].mean() for s in seeds])) for p in ("fp32", "bf16")}
    return {"epochs": epochs, "objective": objective, "k": k, "batch_size": batch, "seeds": list(seeds),
            "runs": runs, "mean_nll": mean, "bf16_minus_fp32": mean["bf16"] - mean["fp32"],
            "paired_stderr": float(np.std(np.concatenate(diffs)) / np.sqrt(sum(len(d) for d in diffs))),
            "seed_spread": spread}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed", action="store_true", help="throughput of each step kind per precision")
    p.add_argument("--parity", action="store_true", help="test NLL of fp32 vs bf16 training at equal epochs")
    p.add_argument("--prior-cost", action="store_true", help="what a VampPrior adds to the engine's scoring")
    p.add_argument("--ablation", action="store_true", help="the recipe and the recipe less one ingredient each")
    p.add_argument("--variants", default=",".join(ABLATIONS), help="ablation variants, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per speed row")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--objective", default="elbo")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the steps run (rows keyed cuda-*)")
    args = p.parse_args(argv)
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    device = torch.device(hardware.resolve_device(args.device))
    where = "" if device.type == "cpu" else f" {device.type}"  # GPU results are keyed apart, with their machine
    report[f"machine{where}"] = hardware.describe(args.threads)
    if device.type == "cuda":
        report["gpu"] = hardware.gpu_name()
    if args.speed:
        report[f"speed{where}"] = speed(args.threads, args.seconds, device)
    if args.prior_cost:
        report["prior_cost"] = prior_cost(args.threads)
    if args.ablation:
        names = [n.strip() for n in args.variants.split(",")]
        if unknown := set(names) - set(ABLATIONS):
            p.error(f"unknown variants {sorted(unknown)}; choose from {list(ABLATIONS)}")
        report.setdefault("ablation", {})[f"e={args.epochs}{where}"] = ablation(args.threads, args.epochs, names,
                                                                                 device)
    if args.parity:
        key = f"parity {args.objective} k={args.k} b={args.batch_size} e={args.epochs}{where}"
        report.setdefault("parity", {})[key] = parity(args.threads, args.epochs, args.objective, args.k,
                                                      args.batch_size, tuple(int(s) for s in args.seeds.split(",")),
                                                      device)
        print(json.dumps({k: v for k, v in report["parity"][key].items() if k != "runs"}, indent=1))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
