"""ONNX export: encoder and decoder as two graphs, validated against PyTorch, with optimized/int8/fp16 variants.

Sampling stays outside the graphs (the caller supplies eps): ONNX random ops are unseeded in ONNX Runtime, and
torch.normal inside a traced graph is constant-folded into fixed noise.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import data, modeldir
from ..core import atomic, rng
from ..core.config import CONFIDENCE_SE, ModelConfig, within_budget
from ..core.errors import ExportError, VaeEngineError
from ..model.networks import VAE
from ..modeldir import graphs
from ..runtime import tuning
from . import tracing

FP32_ATOL = 1e-4  # ORT vs PyTorch, fp32, per unit of an output's scale: both sum the same products in different
#                   orders; errors seen ~1e-5 on logits of order 1, ~1e-6 relative on Gaussian outputs of order 10
FP16_ATOL = 0.1  # fp16 keeps ~3 significant digits; logits of magnitude ~20 round to steps of ~0.01
CALIBRATION_ITEMS = 4096  # training items whose layer inputs calibrate the int8 weights
# a searched int8 layer set is within the budget by the one rule (`config.within_budget`: |mean NLL change| + 2
# standard errors): picking the best of several noisy candidates favours the lucky ones (the shipped model's set
# chosen on the mean alone, +0.0096 +- 0.0047 nats at k=64, measured +0.017 at k=5000 on 1,000 test images)
REPORT = modeldir.EXPORT_REPORT
MAX_REPORT_ITEMS = 10_000  # test items for the accuracy report (all of MNIST's test set)


class _FP32IO(torch.nn.Module):
    """Runs a module in another dtype with float32 inputs and outputs (for the fp16 variant)."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net.to(dtype), dtype

    def forward(self, x: torch.Tensor):
        out = self.net(x.to(self.dtype))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def _int8(fp32: dict[str, onnx.ModelProto], model_dir: Path, cfg: ModelConfig, sha: str, scratch: Path,
          seed: int, step) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    """The int8 graphs to keep: the fastest layer set within the accuracy budget (`quantize`'s docstring).

    Calibration: up to CALIBRATION_ITEMS of the model's training items (binarized as in training) and their
    posterior samples. Each layer's NLL cost alone, then each set grown in `quantize.greedy_order`, is scored with
    tuning's own measure (the same validation items, eps and reference as `--precision auto`) and timed at batch
    1024; the fastest within `tuning.DEFAULT_BUDGET` (by CONFIDENCE_SE) wins (else the most accurate, with a
    warning). Returns the
    two graphs and the report of every candidate."""
    from ..core import hardware
    from ..runtime.engine import Engine
    from . import quantize

    threads = hardware.available_cpus()
    step("int8 calibration")
    x, found, acts = _int8_calibration(fp32, model_dir, cfg, seed, threads)
    ref = tuning.reference(Engine.load, model_dir, threads)
    cand_dir = scratch / "int8-candidate"
    cand_dir.mkdir()
    for name in modeldir.INFERENCE_FILES:
        if (model_dir / name).exists():
            atomic.write_bytes(cand_dir / name, (model_dir / name).read_bytes())
    every = [layer for role in found for layer in found[role]]
    if not every:
        raise ExportError("--quantize int8: this model has no fully connected (Gemm) layer with constant weights "
                          "to quantize; export without --quantize")
    total = sum(layer.macs for layer in every) or 1

    def build(chosen: list) -> dict[str, onnx.ModelProto]:
        protos = {}
        for role in fp32:
            keep = {ly.node: rounded[ly.key] for ly in chosen if ly.graph == role}
            protos[role] = quantize.rewrite(fp32[role], keep, found[role])
            tracing.set_metadata(protos[role], role, "int8", cfg, sha)
        return protos

    def score(chosen: list, timed: bool) -> dict[str, Any]:
        for role, proto in build(chosen).items():
            atomic.write_bytes(graphs.graph_path(cand_dir, role, "int8"), proto.SerializeToString())
        engine = Engine.load(cand_dir, backend="onnxruntime", precision="int8", threads=threads)
        row = {"int8_layers": [ly.key for ly in chosen],
               "int8_macs_fraction": round(sum(ly.macs for ly in chosen) / total, 4),
               **tuning.accuracy(engine, ref)}
        return {**row, "items_per_s": tuning.items_per_s(engine, 1024)} if timed else row

    rounded, cost, how = {}, {}, {}  # per layer: the rounding that measures fewer nats
    for layer in every:
        for name, fn in quantize.ROUNDINGS.items():
            step(f"int8 cost of {layer.key} ({name})")
            rounded[layer.key] = trial = fn(layer.weight, acts[layer.graph][layer.input])
            nats = score([layer], timed=False)["nll_change_nats"]
            if layer.key not in cost or abs(nats) < abs(cost[layer.key]):
                cost[layer.key], how[layer.key], best_trial = nats, name, trial
        rounded[layer.key] = best_trial
    rows, current = [], []
    for layer in quantize.greedy_order(every, cost):
        trial = current + [layer]
        step(f"int8 candidate: {len(trial)} of {len(every)} layers")
        row = score(trial, timed=True)
        rows.append({**row, "within_budget": within_budget(row["nll_change_nats"], row["nll_change_se_nats"],
                                                           tuning.DEFAULT_BUDGET)})
        current = trial if rows[-1]["within_budget"] else current
    fits = [r for r in rows if r["within_budget"]]
    best = max(fits, key=lambda r: r["items_per_s"]) if fits else min(rows, key=lambda r: abs(r["nll_change_nats"]))
    best["chosen"] = True
    chosen = [layer for layer in every if layer.key in best["int8_layers"]]
    report = {"method": "per-item uint8 activations, per-channel int8 weights (GPTQ or nearest rounding)",
              "budget_nats": tuning.DEFAULT_BUDGET, "confidence_se": CONFIDENCE_SE,
              "validation": ref["source"], "accuracy_k": tuning.ACCURACY_K,
              "calibration_items": len(x), "threads": threads, "layer_nll_cost_nats": cost, "layer_rounding": how,
              "candidates": rows}
    return build(chosen), report


def _int8_calibration(fp32: dict[str, onnx.ModelProto], model_dir: Path, cfg: ModelConfig, seed: int, threads: int):
    """Up to CALIBRATION_ITEMS of the model's training items (binarized as in training), the quantizable layers of
    each graph, and each layer's input activations on those items and their posterior samples:
    (x, {role: layers}, {role: {tensor name: activations}})."""
    from ..model.likelihoods import get
    from . import quantize

    lk, train_cfg = get(cfg.likelihood), modeldir.train_config(model_dir)
    items = data.load_training_data(train_cfg).train_images
    pick = np.sort(np.random.default_rng(seed).permutation(len(items))[:CALIBRATION_ITEMS])
    x = data.to_float(items[pick]).reshape(len(pick), -1)
    x = rng.binarize(x, seed, 0) if lk.binarizes(train_cfg.binarize) else x
    found = {role: quantize.layers(fp32[role], role, unit_input=role == "encoder" and lk.unit_interval)
             for role in fp32}  # the decoder's input z is signed
    enc = quantize.layer_inputs(fp32["encoder"], [ly.input for ly in found["encoder"]] + ["mu", "logvar"], x, threads)
    z = enc["mu"] + np.exp(0.5 * enc["logvar"]) * rng.normal_eps(seed, 0, len(x), 1, cfg.latent_dim)[:, 0]
    acts = {"encoder": enc, "decoder": quantize.layer_inputs(fp32["decoder"], [ly.input for ly in found["decoder"]],
                                                             z.astype(np.float32), threads)}
    return x, found, acts


def _test_nelbo(encoder: onnx.ModelProto, decoder: onnx.ModelProto, x_bin: np.ndarray, seed: int, lk,
                prior) -> tuple:
    """(test -ELBO, decoder params) of a graph pair on the model's test items, eps from the counter stream;
    `prior` as the engine runs it (`priors.load`)."""
    from ..model import kernels

    mu, logvar = tracing.run(encoder, x_bin)
    eps = rng.normal_eps(seed, 0, len(x_bin), 1, mu.shape[1])
    z = kernels.reparameterize(mu, logvar, eps)[:, 0]  # the engine's own reparameterization
    eps = eps[:, 0]
    logits = tracing.run(decoder, z)[0]
    log_px = lk.log_prob(torch.from_numpy(x_bin).double(), torch.from_numpy(logits).double()).numpy()
    nelbo = float(np.mean(-(log_px - prior.kl(mu, logvar, z, eps))))
    return nelbo, logits


def export(model_dir: str | Path, out_dir: str | Path | None = None, optimize: bool = False,
           quantize: str | None = None, fp16: bool = False, seed: int = 0, progress=None) -> dict[str, Any]:
    """Export, validate and write encoder/decoder graphs (+ variants) and export_report.json; return the report.

    Nothing is written unless every graph validates.
    """
    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir
    if quantize not in (None, "int8"):
        raise VaeEngineError(f"--quantize supports int8 only, got {quantize!r}")
    cfg = modeldir.model_config(model_dir)
    if not cfg.trained:  # no trainer's model to export: its variants are made from the graphs import checked
        from .imported import export_variants

        return export_variants(model_dir, out_dir, optimize, quantize, fp16, progress)
    model: VAE = modeldir.load_model(model_dir)
    sha = modeldir.weights_sha256(model_dir)
    nets = {"encoder": model.encoder, "decoder": model.decoder}
    train_cfg = modeldir.train_config(model_dir)
    test_items, _ = data.load_test_data(train_cfg)  # the model's own test data, not always MNIST
    x_test = data.to_float(test_items[:MAX_REPORT_ITEMS])
    binarized = model.likelihood.binarizes(train_cfg.binarize)
    x_bin = rng.binarize(x_test, seed, 0) if binarized else x_test
    z_test = np.random.default_rng(seed).standard_normal((37, cfg.latent_dim)).astype(np.float32)
    x_check = np.concatenate([x_test] * -(-37 // len(x_test)))[:37]  # batch 37 even from a tiny test split
    inputs = {"encoder": x_check, "decoder": z_test}  # real test items; random latents
    step = progress or (lambda message: None)

    existed = out_dir.exists()
    try:
        with modeldir.lock(out_dir), atomic.temp_dir(out_dir, "export") as scratch:
            return _export_all(model, nets, cfg, sha, inputs, x_bin, model_dir, out_dir, scratch, optimize, quantize,
                               fp16, seed, step, t_start)
    except BaseException:
        if not existed:  # a failed export into a new --out leaves no folder behind
            atomic.remove_empty([out_dir])
        raise


def _export_all(model, nets, cfg, sha, inputs, x_bin, model_dir: Path, out_dir: Path, scratch: Path, optimize: bool,
                quantize: str | None, fp16: bool, seed: int, step, t_start: float) -> dict[str, Any]:
    """Build, validate and measure every graph, then write them all (the body of `export`)."""
    built, errors = _build_graphs(nets, cfg, sha, inputs, scratch, optimize, fp16, step)
    int8_report = None
    if quantize == "int8":  # both graphs at once: the layers to keep in fp32 are chosen by the NLL of the pair
        int8, int8_report = _int8({role: built[role, "fp32"] for role in nets}, model_dir, cfg, sha, scratch, seed,
                                  step)
        for role, proto in int8.items():  # judged by the NLL measure, not a tolerance: only shapes are checked
            errors[role, "int8"] = tracing.validate(proto, nets[role], inputs[role], np.inf, f"{role}.int8.onnx")
            built[role, "int8"] = proto
    step("accuracy on the test set")
    report = _accuracy_report(model, built, errors, cfg, sha, x_bin, model_dir, out_dir, seed)
    if int8_report:
        report["int8"] = int8_report
        best = next(r for r in int8_report["candidates"] if r.get("chosen"))
        if not best["within_budget"]:
            report["warnings"] = [f"no int8 layer set keeps the mean NLL change within {tuning.DEFAULT_BUDGET} nats "
                                  f"(by {CONFIDENCE_SE:g} standard errors): "
                                  f"kept the most accurate ({best['nll_change_nats']:+.4f}); --precision auto "
                                  "will not choose it"]
    # all graphs validated: write every file into the scratch folder first (a full disk fails here, with
    # nothing replaced), then rename them into place one after another; a separate --out gets config and
    # weights too, so it is a complete model directory
    files: dict[str, bytes] = {}
    if out_dir.resolve() != model_dir.resolve():
        files.update({name: (model_dir / name).read_bytes() for name in modeldir.INFERENCE_FILES
                      if (model_dir / name).exists()})
    for (role, variant), proto in built.items():
        files[graphs.graph_path(out_dir, role, variant).name] = proto.SerializeToString()
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    files[REPORT] = (json.dumps(report, indent=2) + "\n").encode()
    atomic.write_files(out_dir, files, scratch)
    return report


def _build_graphs(nets, cfg, sha, inputs, scratch: Path, optimize: bool, fp16: bool, step):
    """The fp32 graph of each network (onnx.checker, then against PyTorch within FP32_ATOL) and its optimized and
    fp16 variants where asked: ({(role, variant): graph}, {(role, variant): max abs error against PyTorch})."""
    built: dict[tuple[str, str], onnx.ModelProto] = {}
    errors: dict[tuple[str, str], float] = {}
    for role, net in nets.items():
        step(f"export {role}")
        proto, errors[role, "fp32"] = tracing.checked_graph(net, role, cfg, sha, inputs[role], FP32_ATOL)
        built[role, "fp32"] = proto
        variants: list[tuple[str, onnx.ModelProto, float]] = []
        if optimize:
            variants.append(("optimized", tracing.optimized_graph(proto, scratch), FP32_ATOL))
        if fp16:
            half = tracing.trace(_FP32IO(copy.deepcopy(net), torch.float16), role, cfg)
            variants.append(("fp16", half, FP16_ATOL))
        for variant, vproto, atol in variants:
            step(f"{variant} {role}")
            tracing.set_metadata(vproto, role, variant, cfg, sha)
            errors[role, variant] = tracing.validate(vproto, net, inputs[role], atol,
                                                     f"{role}{graphs.VARIANTS[variant]}")
            built[role, variant] = vproto
    return built, errors


def _accuracy_report(model, built, errors, cfg, sha, x_bin, model_dir: Path, out_dir: Path, seed: int) -> dict:
    """export_report.json's body: each variant's files, sizes, errors against PyTorch and test -ELBO change
    against the fp32 graphs, on the same eps."""
    lk = model.likelihood
    prior = modeldir.load_prior(model_dir, cfg)
    base, base_logits = _test_nelbo(built["encoder", "fp32"], built["decoder", "fp32"], x_bin, seed, lk, prior)
    with torch.no_grad():
        mu, logvar = model.encode(torch.from_numpy(x_bin))
        eps = torch.from_numpy(rng.normal_eps(seed, 0, len(x_bin), 1, cfg.latent_dim)[:, 0])
        torch_logits = model.decode(model.reparameterize(mu, logvar, eps)).numpy()
    report: dict[str, Any] = {"model_dir": str(model_dir), "opset": graphs.OPSET, "weights_sha256": sha,
                              "test_images": len(x_bin), "seed": seed, "test_nelbo_fp32": base, "variants": []}
    roles = ("encoder", "decoder")
    for variant in graphs.VARIANTS:
        if ("encoder", variant) not in built:
            continue
        nelbo, logits = _test_nelbo(built["encoder", variant], built["decoder", variant], x_bin, seed, lk, prior)
        report["variants"].append({
            "variant": variant,
            "files": {role: graphs.graph_path(out_dir, role, variant).name for role in roles},
            "bytes": {role: built[role, variant].ByteSize() for role in roles},
            "max_abs_err_vs_torch": {role: errors[role, variant] for role in roles},
            "test_max_abs_logit_err": float(np.max(np.abs(logits - torch_logits))),
            "test_nelbo": nelbo, "test_nelbo_change_nats": nelbo - base,
        })
    return report
