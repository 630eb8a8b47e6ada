"""The `vae-engine` command line: each command is a docstring and one call into the library."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..core.config import DEFAULT_BUDGET, DEFAULT_RULE
from ..core.config import VERSION as __version__
from ..core.errors import VaeEngineError
from ..perf.fraction import percent
from .errors import OneLineErrors, friendly
from .options import (
    ActorsOpt,
    BackendOpt,
    BatchOpt,
    BudgetOpt,
    CpusOpt,
    DeviceOpt,
    FitOpt,
    InputOpt,
    ModelDir,
    ModelOpt,
    PrecisionOpt,
    RayOpt,
    SeedOpt,
    ThreadsOpt,
    comma_list,
)
from .progress import CONSOLE, OUT, Meter, TrainingBar
from .run import path_options, run_job

app = typer.Typer(
    cls=OneLineErrors, help="Train, export and run variational autoencoders fast (PyTorch, ONNX Runtime, Numba).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console, out = CONSOLE, OUT


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vae-engine {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train, export and run variational autoencoders fast (PyTorch, ONNX Runtime, Numba)."""





@app.command()
@friendly
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory to write (config, weights, metrics, plots).")] = Path("runs/mnist-vae"),
    dataset: Annotated[str, typer.Option(help="Named dataset: mnist (bundled), fashion-mnist or kmnist (need --download once).")] = "mnist",
    data_dir: Annotated[Path | None, typer.Option(help="Folder with the four IDX files of any MNIST-format dataset; overrides --dataset.")] = None,
    data: Annotated[Path | None, typer.Option(help="Your own data: .npy/.npz (N, D), (N, H, W) or (N, C, H, W); .csv/.parquet numeric columns; IDX(.gz); or a folder of PNG/JPEG images (grey or RGB). Overrides --dataset.")] = None,
    test: Annotated[Path | None, typer.Option(help="Test data for --data, same format; default: a seeded --val-fraction split of --data (indices recorded in config.json).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of --data held out as the test split when --test is not given.")] = 0.1,
    columns: Annotated[str | None, typer.Option(help="CSV/Parquet: comma-separated column names (or indices) to use; default: all (all must be numeric).")] = None,
    resize: Annotated[str | None, typer.Option(help="Image folders: resize every image to H,W (e.g. 32,32); default: all images must have one size.")] = None,
    likelihood: Annotated[str, typer.Option(help="p(x|z): auto (IDX images -> bernoulli; other data in [0, 1], uint8 or float -> continuous-bernoulli; anything else -> gaussian; the reason goes to config.json), bernoulli (binary; [0, 1] data dynamically binarized), continuous-bernoulli ([0, 1] intensities), gaussian (real values, standardized inside the model).")] = "auto",
    download: Annotated[bool, typer.Option(help="Fetch --dataset into the cache ($VAE_ENGINE_CACHE or ~/.cache/vae-engine) if missing. Off: no network.")] = False,
    binarize: Annotated[str, typer.Option(help="dynamic: re-sample Bernoulli pixels every use (Burda et al.). none: keep grayscale; BCE on grayscale is not a proper likelihood, so its numbers are not comparable NLLs.")] = "dynamic",
    arch: Annotated[str, typer.Option(help="Architecture: mlp; conv (two stride-2 convolutions, then --hidden fully connected layers); or resnet (the same strided layers with a residual block after each and a full-resolution stem: a ResNet-style encoder and a mirrored decoder). Images only.")] = "mlp",
    latent_dim: Annotated[int, typer.Option(help="Size of the latent z.")] = 20,
    hidden: Annotated[str, typer.Option(help="Hidden layer sizes of the encoder, comma-separated; the decoder mirrors them.")] = "400,400",
    activation: Annotated[str, typer.Option(help="Nonlinearity: relu, tanh, elu or softplus.")] = "relu",
    epochs: Annotated[int, typer.Option(help="Passes over the training set (with --resume: the new total).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step.")] = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lr_schedule: Annotated[str, typer.Option(help="constant, or cosine decay to 0 over all epochs.")] = "constant",
    objective: Annotated[str, typer.Option(help="elbo (K&W 2013), iwae (Burda et al. 2015 bound with --k samples) or dreg (the IWAE bound with doubly reparameterized encoder gradients, Tucker et al. 2018: lower-variance, better encoders at large --k).")] = "elbo",
    prior: Annotated[str, typer.Option(help="p(z): normal (N(0, I)) or vamp (VampPrior, Tomczak & Welling 2018: a mixture of the encoder's posteriors on --pseudo-inputs learned inputs; stored in the model folder, used for sampling and scoring).")] = "normal",
    pseudo_inputs: Annotated[int, typer.Option(help="With --prior vamp: the number of pseudo-inputs (mixture components); each adds an encoder pass per training step and a Gaussian per scored sample.")] = 500,
    precision: Annotated[str, typer.Option(help="auto (bf16 where the device has native bf16: a CPU with AVX512_BF16 or AMX, a GPU of compute capability 8.0+; else fp32), fp32, or bf16 (autocast: the networks in bf16; the likelihood, log-densities, log-sum-exp, weights and optimizer in fp32). Recorded in config.json. bf16 reached a test NLL as good as fp32 at equal epochs (README: Training).")] = "auto",
    k: Annotated[int, typer.Option("--k", help="Samples per input: IWAE importance samples, or eps samples averaged by the ELBO.")] = 1,
    kl_warmup: Annotated[int, typer.Option(help="Epochs of linear KL warm-up from 0 to 1 (ELBO objective).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling, binarization and eps; same seed, same weights on CPU.")] = 0,
    nll_every: Annotated[int, typer.Option(help="Every N epochs (and after the last), also record the IWAE NLL (k=1000) of the first 1,000 test items in metrics.jsonl (test_nll_k1000): the NLL-against-time curve. 0: off.")] = 0,
    threads: Annotated[int | None, typer.Option(help="Torch intra-op threads (default: the CPUs this process may use: affinity mask and cgroup quota).")] = None,
    device: Annotated[str, typer.Option(help="Where to train: cpu, cuda, cuda:N, or auto (the first CUDA GPU torch sees, else the CPU). The noise is drawn on the CPU either way, so a run can be resumed on another device. Under torchrun with cuda: one GPU per process (LOCAL_RANK).")] = "cpu",
    limit: Annotated[int | None, typer.Option(help="Use only the first N training images (quick runs).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last complete epoch (a run killed before its first checkpoint starts again).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete the model already in --out (weights, graphs, plots, metrics) and train a new one there.")] = False,
    plots: Annotated[bool, typer.Option(help="Draw plots/ at the end (training curve, reconstructions, samples, traversals).")] = True,
    contamination: Annotated[float | None, typer.Option(help="Also store an anomaly threshold (detector.json, used by `detect`): flag this fraction (0, 0.5] of the training items.")] = None,
    rule: Annotated[str, typer.Option(help="With --contamination: the scoring rule stored (reconstruction, nll, nll-complexity, latent; README: Anomaly detection).")] = DEFAULT_RULE,
) -> None:
    """Train a VAE on the bundled MNIST, an IDX dataset or your own data (--data), and write a model directory."""
    from ..core.atomic import check_writable
    from ..core.config import ModelConfig, TrainConfig
    from ..data.readers import parse_shape
    from ..training.train import train as run_train

    if contamination is not None:
        from ..anomaly.rules import check_rule

        check_rule(rule, contamination)
    model_cfg = ModelConfig(arch=arch, latent_dim=latent_dim, hidden=comma_list("--hidden", hidden.replace("x", ","), int) or (), activation=activation,
                            likelihood=likelihood, prior=prior, pseudo_inputs=pseudo_inputs)
    train_cfg = TrainConfig(
        dataset="dir" if data_dir else dataset, data_dir=str(data_dir.resolve()) if data_dir else None,
        data=str(data.resolve()) if data else None, test_data=str(test.resolve()) if test else None,
        val_fraction=val_fraction, columns=comma_list("--columns", columns),
        resize=parse_shape(resize), binarize=binarize,
        epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, objective=objective, k=k,
        kl_warmup_epochs=kl_warmup, seed=seed, threads=threads, limit=limit, precision=precision,
        nll_every=nll_every,
    )
    check_writable(out_dir, folder=True)

    bar = TrainingBar()
    try:
        run_train(model_cfg, train_cfg, out_dir, resume=resume, callbacks=bar, plots=plots, download=download,
                  overwrite=overwrite, device=device)
    finally:
        if hasattr(bar, "bar"):
            bar.bar.stop()
    if os.environ.get("RANK", "0") == "0":
        if contamination is not None:
            from ..jobs import detect as detect_mod

            offset = detect_mod.store_threshold(out_dir, rule, contamination)
            out.print(f"detector: rule {rule}, threshold {offset:.3f} (flags {contamination:g} of the training items)")
        out.print(f"model directory: {out_dir}")


@app.command()
@friendly
def evaluate(
    model_dir: ModelDir,
    k: Annotated[int, typer.Option("--k", help="Importance samples per image for the NLL estimate (Burda et al. use 5000).")] = 5000,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N test images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the binarization and eps streams (fixed, so runs are comparable).")] = 0,
    backend: Annotated[str, typer.Option(help="auto (on the CPU ONNX Runtime where the model's graphs are exported, else the PyTorch reference; torch on a GPU), torch (the PyTorch reference on the CPU, unless --precision is not fp32), or an engine backend: onnxruntime, openvino, torch-compile.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="Threads for torch / ONNX Runtime / Numba (default: all cores).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
    compare: Annotated[bool, typer.Option(help="Also run the PyTorch reference on the same images and eps: time ratio and largest difference.")] = False,
    precision: Annotated[str, typer.Option(help="fp32 (reproduces the reference), bf16, int8, fp16, or auto (the fastest path within --max-nll-change); with --compare the report gives its measured bias.")] = "fp32",
    max_nll_change: BudgetOpt = DEFAULT_BUDGET,
    device: DeviceOpt = "cpu",
    data: Annotated[Path | None, typer.Option(help="Evaluate on this file or folder instead of the model's own test split (any format train --data reads).")] = None,
    columns: Annotated[str | None, typer.Option(help="With --data as CSV/Parquet: the columns to use, comma-separated.")] = None,
) -> None:
    """-ELBO and importance-weighted NLL on the model's test split (Bernoulli models: dynamically binarized)."""
    from ..core.atomic import check_writable
    from ..core.config import MAX_SCORE_K, SEED_MAX, check_int
    from ..jobs.evaluate import evaluate_model

    check_int("--k", k, 1, MAX_SCORE_K)
    check_int("--seed", seed, 0, SEED_MAX)
    if limit is not None:
        check_int("--limit", limit, 1)
    if columns and data is None:
        raise VaeEngineError("--columns picks columns of --data (a .csv or .parquet file); pass --data too")
    if json_path:
        check_writable(json_path)
    with Meter("evaluate", "images", info=f"k={k}") as meter:
        result = evaluate_model(model_dir, k=k, limit=limit, seed=seed, backend=backend, threads=threads,
                                start=meter.start, progress=meter.advance, compare=compare, precision=precision,
                                max_nll_change=max_nll_change, device=device,
                                data_path=str(data) if data else None,
                                columns=comma_list("--columns", columns))
    from rich.table import Table  # only the commands that print tables import it (~15 ms of every command)

    table = Table(title=f"evaluation of {model_dir} ({result['n']} test items, seed {seed})")
    for col in ("path", "-ELBO (nats)", f"NLL k={k} (nats)", "seconds"):
        table.add_column(col)
    table.add_row(result["path"], f"{result['test_nelbo']:.3f} ± {result['test_nelbo_stderr']:.3f}",
                  f"{result['test_nll']:.3f} ± {result['test_nll_stderr']:.3f}", f"{result['seconds']:.1f}")
    ref = result.get("reference")
    if ref:
        table.add_row("torch (reference)", f"{ref['test_nelbo']:.3f}", f"{ref['test_nll']:.3f}", f"{ref['seconds']:.1f}")
    out.print(table)
    work = result["work"]
    limit = (f"{work['limit_seconds']:.3g} s at this machine's GEMM peak per precision, "
             f"{percent(work['fraction_of_limit'])} of that limit") if work["fraction_of_limit"] else "no peak here"
    out.print(f"{sum(work['multiply_adds'].values()):.3g} multiply-adds "
              f"({', '.join(f'{p} {m:.2g}' for p, m in work['multiply_adds'].items())}): {limit}")
    if ref:
        out.print(f"{result['path']} is {ref['speedup']:.2f}x the PyTorch reference; mean NLL change "
                  f"{ref['mean_diff_nll']:+.4f} nats; largest per-image difference: -ELBO "
                  f"{ref['max_abs_diff_nelbo']:.2e}, NLL {ref['max_abs_diff_nll']:.2e} nats")
    if json_path:
        from ..core import atomic

        atomic.write_json(json_path, result)


@app.command()
@friendly
def export(
    model_dir: ModelDir,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write a complete model directory here (config, weights, graphs) instead of adding the graphs to MODEL_DIR.")] = None,
    optimize: Annotated[bool, typer.Option(help="Also save ONNX Runtime's optimized graph (*.opt.onnx; may hold ORT-only fused ops).")] = False,
    quantize: Annotated[str | None, typer.Option(help="int8: also save int8 graphs (*.int8.onnx), with the layers kept in int8 chosen by measured accuracy (nats, or an imported autoencoder's reconstruction change) within --precision auto's budget: per-item-scaled matrix products for the trainer's MLPs, static QDQ convolutions for an imported model.")] = None,
    fp16: Annotated[bool, typer.Option(help="Also save half-precision graphs (*.fp16.onnx) for GPU providers; slower on CPU.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the test-set binarization and eps used for the accuracy report.")] = 0,
) -> None:
    """Export encoder.onnx and decoder.onnx, validate them against PyTorch, and report each variant's accuracy.

    On a folder made by `vae-engine import` (whose fp32 graphs import already checked), export makes the
    --quantize int8 and --optimize variants from those graphs.
    """
    from ..core.atomic import check_writable
    from ..export.exporter import REPORT
    from ..export.exporter import export as run_export

    check_writable(out_dir or model_dir, folder=True)

    with console.status("exporting") as status:
        report = run_export(model_dir, out_dir, optimize=optimize, quantize=quantize, fp16=fp16, seed=seed,
                            progress=lambda message: status.update(message))
    if "variants" not in report:  # an imported model: variants made from the fp32 graphs import checked
        _print_imported_variants(report)
        for warning in report.get("warnings", []):
            console.print(f"[yellow]warning:[/] {warning}")
        out.print(f"exported in {report['variants_seconds']:.1f} s; report: {Path(out_dir or model_dir) / REPORT}")
        return
    from rich.table import Table

    table = Table(title=f"export of {model_dir} (opset {report['opset']}, {report['test_images']} test images)")
    for col in ("variant", "MB enc+dec", "max|err| enc", "max|err| dec", "max|err| test", "test -ELBO", "Δ nats"):
        table.add_column(col)
    for v in report["variants"]:
        err = v["max_abs_err_vs_torch"]
        table.add_row(v["variant"], f"{(v['bytes']['encoder'] + v['bytes']['decoder']) / 1e6:.2f}",
                      f"{err['encoder']:.1e}", f"{err['decoder']:.1e}", f"{v['test_max_abs_logit_err']:.1e}",
                      f"{v['test_nelbo']:.3f}", f"{v['test_nelbo_change_nats']:+.4f}")
    out.print(table)
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    out.print(f"exported in {report['seconds']:.1f} s; report: {Path(out_dir or model_dir) / REPORT}")


def _print_imported_variants(report: dict) -> None:
    """What `export` made of an imported model: each variant's difference from fp32, its cost and speed."""
    from ..runtime.tuning import cost_text

    if "optimized" in report:
        err = report["optimized"]["max_abs_err_vs_fp32"]
        out.print(f"optimized: max |err| against fp32 encoder {err['encoder']:.1e}, decoder {err['decoder']:.1e}")
    q = report.get("int8")
    if q and q["accuracy"]:
        kept = ", ".join(f"{role} {len(q['int8_layers'][role])} of {q['layers'][role]} layers"
                         + (f" ({q['speedup_vs_fp32_one_item'][role]:.2f}x fp32)" if role in
                            q["speedup_vs_fp32_one_item"] else "") for role in ("encoder", "decoder"))
        out.print(f"int8: {kept}; {cost_text(q['accuracy'])} on {q['validation']} (budget: {q['budget']})")


@app.command("import")
@friendly
def import_(
    source: Annotated[str, typer.Argument(help="A diffusers AutoencoderKL: its folder (config.json and diffusion_pytorch_model.safetensors; save_pretrained writes one), a pipeline folder holding it in vae/, or a Hugging Face hub id (downloaded where this machine has the network).")],
    out_dir: Annotated[Path, typer.Option("--out", help="The new model folder to write (config.json, model.safetensors, encoder.onnx, decoder.onnx, export_report.json).")],
    size: Annotated[str, typer.Option(help="H,W of the images the model folder takes (multiples of the autoencoder's downsampling, 8 for Stable Diffusion's); its latents are (latent channels, H/8, W/8).")] = "256,256",
) -> None:
    """Import a pretrained diffusers AutoencoderKL (Stable Diffusion's VAE and its relatives) as a model folder.

    Its items are images in [0, 1] (uint8 files or arrays; mapped to the autoencoder's [-1, 1] inside the graphs);
    its latents are the autoencoder's posterior mean times its scaling_factor (after shift_factor), the latents a
    diffusion model trains on. encode, decode, reconstruct, serve and bench run on it; it declares no likelihood
    and no prior, so score, evaluate and sample do not. Your own PyTorch modules import through the Python API
    (vae_engine.import_modules). Needs pip install 'vae-engine[diffusers]'.
    """
    from ..core.atomic import check_writable
    from ..data.readers import parse_shape
    from ..export.imported import import_diffusers

    check_writable(out_dir, folder=True)
    shape = parse_shape(size, "--size")
    with console.status("importing") as status:
        report = import_diffusers(source, out_dir, shape, progress=lambda message: status.update(message))
    err = report["max_abs_err_vs_torch"]
    out.print(f"wrote {out_dir}: latents {tuple(report['latent_shape'])} per image (scaling factor "
              f"{report['scaling_factor']:g}); graphs against PyTorch, max |err| encoder {err['encoder']:.1e}, "
              f"decoder {err['decoder']:.1e}; {report['seconds']:.1f} s")


@app.command()
@friendly
def info(model_dir: ModelOpt = None) -> None:
    """Show what a model directory holds: config, training metrics, graphs and their metadata, evaluation."""
    from ..modeldir import resolve_model_dir
    from .info import describe

    describe(resolve_model_dir(model_dir), out)


@app.command()
@friendly
def tune(
    model_dir: ModelOpt = None,
    batch_size: Annotated[str, typer.Option(help="Batch sizes to decide for, comma-separated (each job's --batch-size picks its decision).")] = "1,1024",
    backend: BackendOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu", threads: ThreadsOpt = None,
    seconds: Annotated[float, typer.Option(help="Most time the timing rounds of one decision may take (jobs take 0.6 s).")] = 3.0,
) -> None:
    """Measure --precision auto's decision again, thoroughly: each path's accuracy (once per model and CPU class)
    and longer interleaved timing rounds at each batch size; saved where the jobs find it (MODEL/tuning.json, or the
    user's cache folder for a read-only model)."""
    from ..core.config import MAX_BATCH, MAX_THREADS, check_int
    from ..modeldir import resolve_model_dir
    from ..runtime import tuning
    from ..runtime.engine import Engine
    from .info import decision_table

    batches = [check_int("--batch-size", b, 1, MAX_BATCH) for b in comma_list("--batch-size", batch_size, int) or ()]
    if threads is not None:
        check_int("--threads", threads, 1, MAX_THREADS)
    if not (0 < seconds <= 600):
        raise VaeEngineError(f"--seconds must be in (0, 600], got {seconds}")
    model_dir = resolve_model_dir(model_dir)
    for batch in batches:
        with CONSOLE.status(f"batch {batch}: measuring") as status:
            d = tuning.choose(Engine.load, model_dir, backend, path_options(backend, "auto", max_nll_change, device)["device"],
                              threads, batch, max_nll_change, retune=True, seconds=seconds,
                              progress=lambda message, b=batch: status.update(f"batch {b}: {message}"))
        out.print(decision_table(d, "this CPU"))
        out.print(f"batch {batch}: {tuning.describe_path(d['backend'], d['precision'], d)}"
                  + ("" if d["clear"] else " (ranking not clear within the time; later jobs re-check it)")
                  + (f"; saved to {d['saved_to']}" if d.get("saved") else "; not saved (nothing writable)"))


# ---- batch jobs ----

@app.command()
@friendly
def encode(
    model_dir: ModelOpt = None, input: InputOpt = ..., output: Annotated[Path, typer.Option("--output", "-o", help="Latents .npy, or .safetensors (one tensor, 'latents'), of the model's latent shape: (N, L) for a trained VAE, (N, C, h, w) for an imported autoencoder (scaled as it declares); (N, 2, ...) with --with-logvar.")] = ...,
    sample: Annotated[bool, typer.Option(help="Write a posterior sample z ~ q(z|x) instead of the mean.")] = False,
    with_logvar: Annotated[bool, typer.Option(help="Also write logvar: output (N, 2, ...), [:, 0] = z, [:, 1] = logvar.")] = False,
    fit: FitOpt = False,
    backend: BackendOpt = "auto", precision: PrecisionOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu", batch_size: BatchOpt = 1024, threads: ThreadsOpt = None,
    seed: SeedOpt = 0, ray: RayOpt = None, actors: ActorsOpt = 1, cpus_per_actor: CpusOpt = 1,
) -> None:
    """Encode images to latents (posterior mean, or a sample with --sample)."""
    run_job("encode", model_dir, input, output, {"sample": sample, "with_logvar": with_logvar, "seed": seed, "fit": fit}, path_options(backend, precision, max_nll_change, device), batch_size, threads, ray, actors, cpus_per_actor)


@app.command()
@friendly
def decode(
    model_dir: ModelOpt = None, input: Annotated[Path, typer.Option("--input", "-i", help="Latents .npy or .safetensors (what encode writes) of the model's latent shape, (N, L) or (N, C, h, w), or flattened (N, L).")] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Items: .npy or .safetensors (one tensor, 'items') (N, D), D the values of one item (784 for MNIST), a .png grid of images, or a new folder (a path without suffix) of one PNG file per item.")] = ...,
    sample: Annotated[bool, typer.Option(help="Write one draw x ~ p(x|z) per latent instead of E[x|z]: Bernoulli pixels (0/1), continuous-Bernoulli intensities or Gaussian values, from the seed's per-item streams.")] = False,
    binary: Annotated[bool, typer.Option(help="Bernoulli models: the same as --sample (pixels 0/1).")] = False,
    backend: BackendOpt = "auto", precision: PrecisionOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu", batch_size: BatchOpt = 1024, threads: ThreadsOpt = None,
    seed: SeedOpt = 0, ray: RayOpt = None, actors: ActorsOpt = 1, cpus_per_actor: CpusOpt = 1,
) -> None:
    """Decode latents: E[x|z] (pixel probabilities for Bernoulli), or one draw x ~ p(x|z) with --sample."""
    run_job("decode", model_dir, input, output, {"sample": sample, "binary": binary, "seed": seed}, path_options(backend, precision, max_nll_change, device), batch_size, threads,
         ray, actors, cpus_per_actor)


@app.command()
@friendly
def sample(
    model_dir: ModelOpt = None, n: Annotated[int, typer.Option("-n", help="Number of images to sample.")] = 64,
    output: Annotated[Path, typer.Option("--output", "-o", help="Items: .npy or .safetensors (one tensor, 'items') (N, D), a .png grid of images, or a new folder (a path without suffix) of one PNG file per item.")] = Path("samples.png"),
    backend: BackendOpt = "auto", precision: PrecisionOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu", batch_size: BatchOpt = 1024, threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Sample items from the model's prior (N(0, I), or its VampPrior mixture), decoded to E[x|z]. The same seed
    gives byte-identical output."""
    from ..core.config import check_int

    check_int("-n", n, 1, 10**9)
    run_job("sample", model_dir, None, output, {"seed": seed}, path_options(backend, precision, max_nll_change, device), batch_size, threads, n=n)


@app.command()
@friendly
def reconstruct(
    model_dir: ModelOpt = None, input: InputOpt = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Items: .npy or .safetensors (one tensor, 'items') (N, D), D the values of one item (784 for MNIST), a .png grid of images, or a new folder (a path without suffix) of one PNG file per item.")] = ...,
    fit: FitOpt = False,
    backend: BackendOpt = "auto", precision: PrecisionOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu", batch_size: BatchOpt = 1024, threads: ThreadsOpt = None,
    seed: SeedOpt = 0, ray: RayOpt = None, actors: ActorsOpt = 1, cpus_per_actor: CpusOpt = 1,
) -> None:
    """Reconstruct images: decode the posterior mean of each input."""
    run_job("reconstruct", model_dir, input, output, {"seed": seed, "fit": fit}, path_options(backend, precision, max_nll_change, device), batch_size, threads, ray, actors,
         cpus_per_actor)


@app.command()
@friendly
def score(
    model_dir: ModelOpt = None, input: InputOpt = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Scores .npy or .safetensors (one tensor, 'scores') (N,): nats per input, higher = less likely.")] = ...,
    k: Annotated[int, typer.Option("--k", help="1: -ELBO; more: IWAE negative log-likelihood with K importance samples.")] = 1,
    binarize: Annotated[bool, typer.Option(help="Binarize inputs with the seeded stream first (as the model was trained).")] = True,
    rule: Annotated[str, typer.Option(help="nll: -ELBO / IWAE NLL as above. Or an anomaly rule, written as minus its normality score (higher = more unusual): reconstruction (-log p(x|z=mu)), latent and nll-complexity (need detector.json: train --contamination).")] = "nll",
    backend: BackendOpt = "auto", precision: PrecisionOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu", batch_size: BatchOpt = 256, threads: ThreadsOpt = None,
    seed: SeedOpt = 0, ray: RayOpt = None, actors: ActorsOpt = 1, cpus_per_actor: CpusOpt = 1,
) -> None:
    """Score inputs by -ELBO or IWAE negative log-likelihood (or an anomaly rule with --rule)."""
    run_job("score", model_dir, input, output, {"k": k, "seed": seed, "binarize": binarize, "rule": rule}, path_options(backend, precision, max_nll_change, device),
         batch_size, threads, ray, actors, cpus_per_actor)


@app.command()
@friendly
def detect(
    model_dir: ModelDir, input: InputOpt = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Flags .npy (N,) int8: +1 inlier, -1 outlier.")] = ...,
    scores: Annotated[Path | None, typer.Option(help="Also write the normality scores .npy (N,) float64 (higher = more normal).")] = None,
    contamination: Annotated[float | None, typer.Option(help="Instead of the stored threshold: flag this fraction (0, 0.5] of these inputs.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Instead of the stored threshold: flag items whose score is below this.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Known labels .npy (N,) (1 or True = anomaly): adds ROC AUC / average precision, and ROC and PR curves to --plot.")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG: histogram of the scores with the threshold (and ROC/PR curves with --labels).")] = None,
    backend: BackendOpt = "auto",
    precision: Annotated[str, typer.Option(help="fp32 (default: the precision the stored threshold was calibrated in), or bf16, int8, fp16, auto as for the other jobs; another precision shifts the scores by its own NLL change.")] = "fp32",
    threads: ThreadsOpt = None,
) -> None:
    """Flag anomalies with the scoring rule and threshold stored in MODEL_DIR/detector.json (train --contamination,
    or VAEOutlierDetector.save)."""
    from ..jobs import detect as detect_mod

    result = detect_mod.run(model_dir, input, output, scores, contamination, threshold, labels, plot, threads,
                            backend, precision)
    out.print(f"{result['flagged']} of {result['n']} items flagged as anomalies (rule {result['rule']}, threshold "
              f"{result['threshold']:.3f}" + (f"; ROC AUC {result['roc_auc']:.3f}, AP {result['average_precision']:.3f}"
                                              if "roc_auc" in result else "") + f"); wrote {output}")


@app.command()
@friendly
def serve(
    model_dir: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Micro-batching: the most items merged into one engine call (1: no batching).")] = 256,
    max_wait_ms: Annotated[float, typer.Option(help="Micro-batching: how long the first request of a batch waits for others, in ms (0: merge only what is already queued).")] = 2.0,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes, each with its own engine and batcher (one process is bounded by its interpreter: use one per core to serve more requests); without --threads each takes cores / workers threads.")] = 1,
    backend: BackendOpt = "auto", precision: PrecisionOpt = "auto", max_nll_change: BudgetOpt = DEFAULT_BUDGET, device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB (413 beyond).")] = 16.0,
    max_items: Annotated[int, typer.Option(help="Most items per request (413 beyond).")] = 4096,
    max_k: Annotated[int, typer.Option(help="Largest k a score request may ask for (422 beyond).")] = 5000,
    timeout_s: Annotated[float, typer.Option(help="Seconds from a request's arrival to its answer (504 beyond).")] = 30.0,
    max_work: Annotated[int | None, typer.Option(help="Most decoder rows one request may cost (items x k for score; 413 beyond, saying what to send instead). Default: a quarter of --timeout-s at the decoder rate measured at start-up.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve instead of uvicorn (local Ray; needs the distributed extra: ray\\[serve]).")] = False,
    replicas: Annotated[int, typer.Option(help="With --ray: number of replicas.")] = 1,
    grpc_port: Annotated[int | None, typer.Option(help="Also serve the Open Inference Protocol (KServe v2) over gRPC on this port (Triton's default: 8001; needs the 'grpc' extra; not with --ray).")] = None,
) -> None:
    """Serve the model over HTTP: /v1/encode, decode, reconstruct, sample, score, detect with micro-batching;
    the Open Inference Protocol (KServe v2: /v2/models/NAME-OP/infer, JSON or binary tensors; gRPC with
    --grpc-port) for Triton/KServe clients; /metrics (Prometheus), /docs (OpenAPI), and a page at /."""
    from ..core.config import MAX_BATCH, MAX_SCORE_K, check_int
    from ..modeldir import resolve_model_dir

    check_int("--port", port, 0, 65535)
    check_int("--max-batch", max_batch, 1, MAX_BATCH)
    check_int("--workers", workers, 1, 64)
    check_int("--max-items", max_items, 1, MAX_BATCH)
    check_int("--max-k", max_k, 1, MAX_SCORE_K)
    check_int("--replicas", replicas, 1, 64)
    if max_work is not None:
        check_int("--max-work", max_work, 1)
    if grpc_port is not None:
        check_int("--grpc-port", grpc_port, 1, 65535)
        if ray:
            raise VaeEngineError("--grpc-port is for the uvicorn server; Ray Serve has its own gRPC proxy (drop --ray)")
        if grpc_port == port:
            raise VaeEngineError(f"--grpc-port {grpc_port} is the HTTP --port too; choose another (e.g. {port + 1})")
    for name, value in (("--max-wait-ms", max_wait_ms), ("--max-body-mb", max_body_mb), ("--timeout-s", timeout_s)):
        if not (value >= 0 and value < float("inf")):
            raise VaeEngineError(f"{name} must be a finite number >= 0, got {value}")
    try:
        from ..serving import server
    except ImportError as exc:
        raise VaeEngineError(f"serve needs the 'serve' extra ({exc.name} is missing): pip install 'vae-engine[serve]'") from None
    limits = server.Limits(int(max_body_mb * (1 << 20)), max_items, max_k, timeout_s, max_work)
    settings = {"backend": backend, "precision": precision, "threads": threads, "max_batch": max_batch,
                "max_wait_ms": max_wait_ms, "max_nll_change": max_nll_change, "device": device}
    model_dir = resolve_model_dir(model_dir)

    def announce():
        grpc = f", KServe v2 gRPC on {host}:{grpc_port}" if grpc_port is not None else ""
        out.print(f"serving {model_dir} on http://{host}:{port} (page at /, API docs at /docs{grpc}); Ctrl-C to stop")

    if ray:
        from ..serving import ray_serve

        ray_serve.run(model_dir, host, port, replicas, limits, on_ready=announce, **settings)
    else:
        server.serve(model_dir, host, port, workers, limits, on_ready=announce, grpc_port=grpc_port, **settings)


@app.command()
@friendly
def bench(
    model_dir: ModelOpt = None,
    backends: Annotated[str | None, typer.Option(help="Comma-separated: torch, torch-bf16, torch-compile, ort-fp32, ort-opt, ort-int8, ov-fp32, ov-bf16, torch-cuda, torch-cuda-bf16, torch-cuda-fp16, ort-cuda, ort-cuda-fp16 (default: all; those that cannot run here are skipped with the reason; --quick: torch, ort-fp32, ort-int8).")] = None,
    batches: Annotated[str | None, typer.Option(help="Comma-separated batch sizes (default 1,64,1024,8192; --quick: 1,1024).")] = None,
    ops: Annotated[str, typer.Option(help="Comma-separated operations: encode, decode, reconstruct.")] = "encode,decode,reconstruct",
    threads: ThreadsOpt = None,
    spin: Annotated[bool, typer.Option(help="Let ONNX Runtime worker threads spin between runs (lower latency alone, slows other work).")] = False,
    quick: Annotated[bool, typer.Option(help="A short run (under 30 s): fewer backends and batch sizes, shorter timing.")] = False,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the JSON report.")] = Path("bench.json"),
    plot_path: Annotated[Path, typer.Option("--plot", help="Where to write the PNG chart: one panel per operation (items/s vs batch, GEMM-peak ceilings), batch-1 latency.")] = Path("bench.png"),
    markdown_path: Annotated[Path | None, typer.Option("--markdown", help="Also write the results as Markdown: between a page's bench-table markers (docs/benchmarks/backends.md), or as the whole file.")] = None,
    auto: Annotated[bool, typer.Option(help="Mark with * the row --precision auto takes at each batch size (its decision reused from the model's tuning.json, or measured: ~10 s per batch size); not with --quick.")] = True,
) -> None:
    """Compare backends on one model in one run: latency p50/p90/p99, samples/s, GFLOP/s vs this machine's GEMM peak."""
    from ..core import atomic
    from ..core.figures import bench_chart
    from ..modeldir import resolve_model_dir
    from ..runtime import bench as bench_mod

    for path in (json_path, plot_path, markdown_path):
        if path is not None:
            atomic.check_writable(path)

    op_list = comma_list("--ops", ops)
    for op in op_list:
        if op not in bench_mod.OPS:
            raise VaeEngineError(f"unknown op {op!r}: choose from {', '.join(bench_mod.OPS)}")
    labels = comma_list("--backends", backends)
    known = list(bench_mod.BY_LABEL)
    for label in labels or ():
        if label not in known:
            raise VaeEngineError(f"unknown backend {label!r}: choose from {', '.join(known)}")
    batch_list = comma_list("--batches", batches, int)
    from ..core.config import MAX_BATCH, MAX_THREADS, check_int

    for b in batch_list or ():
        check_int("batch size", b, 1, MAX_BATCH)
    if threads is not None:
        check_int("--threads", threads, 1, MAX_THREADS)
    with console.status("benchmarking") as status:
        report = bench_mod.benchmark(resolve_model_dir(model_dir), labels, batch_list, op_list, threads, quick, spin,
                               progress=lambda message: status.update(f"benchmarking: {message}"), auto=auto)
    import shlex
    import sys

    report["command"] = shlex.join(["vae-engine", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "vae-engine bench"
    for renderable in bench_mod.render(report):
        out.print(renderable)
    atomic.write_json(json_path, report)
    if markdown_path:
        from ..perf import pages

        pages.write_section(markdown_path, bench_mod.SECTION, bench_mod.markdown(report))
    bench_chart(report, plot_path, [c.label for c in bench_mod.CANDIDATES])
    out.print(f"wrote {json_path} and {plot_path}")


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so `kill` cleans up temp files like Ctrl-C does


def main() -> None:
    """Console-script entry point."""
    import signal

    # OpenMP workers that spin while waiting steal the CPU from any other busy process and slow down many
    # times over when the machine is shared; passive waiting degrades gracefully (README: "Threads").
    # Set before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _terminate)
    import sys

    ((_only(sys.argv[1]) if len(sys.argv) > 1 else None) or app)()


def _only(name: str) -> typer.Typer | None:
    """The app with its one command `name` (and the group's options): Typer builds a click command from every
    registered command's signature on each run (~15 ms for all of them, a tenth of a short job); the command runs
    and prints its help the same either way. None for anything but a command's name (--help, a typo)."""
    import copy

    from typer.main import get_command_name

    found = [c for c in app.registered_commands if get_command_name(c.name or c.callback.__name__) == name]
    if not found:
        return None
    one = copy.copy(app)
    one.registered_commands = found
    return one

