"""Bring a pretrained VAE in: a diffusers AutoencoderKL folder (`import_diffusers`, `vae-engine import`) or a
user's own encoder and decoder modules (`import_modules`) become a model folder like the trainer's: config.json
(the declaration: shapes, likelihood, scaling), model.safetensors (the source's weights, float32, every tensor
checked on load), encoder.onnx and decoder.onnx (the engine's wrappers, `model/imported.py`, traced and checked
against PyTorch) and export_report.json. Weights are read from safetensors only: never a pickle, never remote
code."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import modeldir
from ..core import atomic
from ..core.config import LIKELIHOODS, ImportSpec, ModelConfig, to_dict
from ..core.errors import DataError, ModelDirError, VaeEngineError, first_line, missing_dependency
from ..data.datasets import sample_photos
from ..model import imported
from ..modeldir import graphs
from .exporter import checked_graph

MAX_IMPORT_SIDE = 4096  # pixels: an image side larger than this is not a VAE input we can export and check
# ONNX Runtime against PyTorch, per unit of an output's scale: an imported network is deep (the SD VAE's decoder:
# ~30 convolutions and a 4,096-token attention at 512x512), and float rounding in another summation order reached
# 4.1e-4 there (random weights), where the trainer's networks stay under FP32_ATOL; a quarter of a grey level
IMPORT_ATOL = 1e-3


def _diffusers_folder(source: str | os.PathLike) -> tuple[str, str | None]:
    """(where from_pretrained reads, its subfolder): a folder with AutoencoderKL's config.json, a pipeline folder
    with one in vae/, or (not a local path) a Hugging Face hub id."""
    path = Path(source)
    if not path.exists():
        if str(source).count("/") == 1 and not str(source).startswith((".", "/")):
            return str(source), None  # a hub id: from_pretrained downloads it where this machine has the network
        raise DataError(f"{source}: not found; pass a diffusers AutoencoderKL folder (config.json and "
                        "diffusion_pytorch_model.safetensors) or a hub id")
    if not path.is_dir():
        raise DataError(f"{source}: is a file; pass the folder that holds the AutoencoderKL's config.json")
    for folder, sub in ((path, None), (path / "vae", "vae")):
        if (folder / "config.json").is_file():
            doc = modeldir.read_json(folder / "config.json", "diffusers config")
            name = doc.get("_class_name") if isinstance(doc, dict) else None
            if name == "AutoencoderKL":
                imported.check_autoencoder_kl(doc)  # its sizes, before diffusers allocates anything
                return str(path), sub
            if sub is None and name is not None and not (path / "vae").is_dir():
                raise DataError(f"{folder / 'config.json'}: describes a {name}, not an AutoencoderKL")
    raise DataError(f"{source}: no AutoencoderKL config.json in it (or in its vae/ folder)")


def load_diffusers(source: str | os.PathLike) -> nn.Module:
    """The AutoencoderKL of a folder or hub id, float32 and in eval mode, from safetensors weights only."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise (missing_dependency(exc, "vae-engine import") or exc) from None
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    where, sub = _diffusers_folder(source)
    try:
        vae = AutoencoderKL.from_pretrained(where, subfolder=sub, use_safetensors=True, torch_dtype=torch.float32,
                                            local_files_only=Path(where).exists())
    except (OSError, ValueError) as exc:
        text = first_line(exc, 250)
        folder = Path(where) / (sub or "")
        if folder.is_dir() and not any(folder.glob("*.safetensors")):  # only pickled weights (or none) there
            raise DataError(f"{source}: no safetensors weights; vae-engine never loads pickled weights (.bin, "
                            ".ckpt): convert them to safetensors first") from None
        raise DataError(f"{source}: diffusers cannot load it ({text})") from None
    except Exception as exc:  # a damaged weights file, a config diffusers cannot build
        raise DataError(f"{source}: diffusers cannot load it ({type(exc).__name__}: {first_line(exc, 250)})") from None
    return vae.float().eval()


def import_diffusers(source: str | os.PathLike, out: str | os.PathLike, size: tuple[int, int] = (256, 256),
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A diffusers AutoencoderKL (a folder, a pipeline folder's vae/, or a hub id) as the model folder `out`, for
    images of `size` (H, W): the engine's items are those images in [0, 1], its latents the model's latents times
    its scaling_factor (after subtracting shift_factor), as a diffusion model trains on them. Returns the report."""
    h, w = _size(size)
    _check_new(out)  # before seconds of loading
    step = progress or (lambda message: None)
    step("load the AutoencoderKL")
    vae = load_diffusers(source)
    conf = json.loads(vae.to_json_string())
    factor = 2 ** (len(conf.get("block_out_channels", [1])) - 1)
    if h % factor or w % factor:
        raise VaeEngineError(f"--size {h},{w}: this AutoencoderKL downsamples by {factor}; choose sides that are "
                             f"multiples of {factor}")
    latent_shape = (int(conf.get("latent_channels", 4)), h // factor, w // factor)
    spec = ImportSpec(source="diffusers", scaling_factor=float(conf.get("scaling_factor") or 1.0),
                      shift_factor=float(conf.get("shift_factor") or 0.0), input_range=(-1.0, 1.0),
                      output_range=(-1.0, 1.0), config=conf, origin=str(source))
    cfg = _model_config((int(conf.get("in_channels", 3)), h, w), latent_shape, "none", "none", "autoencoder-kl", spec)
    return _write(out, cfg, imported.wrap_diffusers(cfg, vae), vae.state_dict(), step)


def import_modules(encoder: nn.Module, decoder: nn.Module, out: str | os.PathLike, input_shape: tuple[int, ...],
                   latent_shape: tuple[int, ...], likelihood: str = "none", prior: str = "none",
                   scaling_factor: float = 1.0, shift_factor: float = 0.0,
                   input_range: tuple[float, float] | None = None, output_range: tuple[float, float] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Your own PyTorch modules as the model folder `out`.

    `encoder` maps a batch (B, *input_shape) (in `input_range` when given: the engine's items are in [0, 1] and
    are mapped there) to (mean, log-variance), each (B, *latent_shape); `decoder` maps latents (B, *latent_shape)
    to the likelihood's parameters (B, P*D) (see `likelihoods/`), or for likelihood "none" to the reconstruction
    (B, *input_shape) (in `output_range` when given, mapped back to [0, 1]). `prior`: "normal" (N(0, I): sample
    and scores work) or "none". `scaling_factor`/`shift_factor`: the latents the engine returns are
    (mean - shift) * scale. Every declaration is checked on a real batch before anything is written; the folder
    runs on its graphs (ONNX Runtime, OpenVINO), not on the torch backend (it has no code for your modules)."""
    _check_new(out)
    step = progress or (lambda message: None)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        if not isinstance(module, nn.Module):
            raise VaeEngineError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
    if likelihood not in LIKELIHOODS:
        raise VaeEngineError(f"unknown likelihood {likelihood!r}: choose one of {', '.join(LIKELIHOODS)}")
    if prior not in ("normal", "none"):
        raise VaeEngineError(f"prior must be normal or none for imported modules, got {prior!r}")
    if output_range is not None and likelihood != "none":
        raise VaeEngineError("output_range is for a decoder that returns the reconstruction (likelihood none); a "
                             f"{likelihood} decoder returns its parameters")
    spec = ImportSpec(source="modules", scaling_factor=scaling_factor, shift_factor=shift_factor,
                      input_range=input_range, output_range=output_range)
    cfg = _model_config(tuple(input_shape), tuple(latent_shape), likelihood, prior, "modules", spec)
    model = imported.ImportedVAE(cfg, nn.ModuleDict({"encoder": encoder, "decoder": decoder}), encoder, decoder)
    return _write(out, cfg, model.eval(), model.source.state_dict(), step)


def _check_new(out: str | os.PathLike) -> None:
    """An import writes a new model folder: never over one that holds a model."""
    if (Path(out) / modeldir.CONFIG).exists():
        raise VaeEngineError(f"{out}: already holds a model; choose a new folder")


def _size(size: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            type(v) is int and 8 <= v <= MAX_IMPORT_SIDE for v in size):
        raise VaeEngineError(f"--size must be H,W with sides of 8 to {MAX_IMPORT_SIDE} pixels, got {size!r}")
    return int(size[0]), int(size[1])


def _model_config(input_shape, latent_shape, likelihood, prior, arch, spec: ImportSpec) -> ModelConfig:
    for name, shape in (("input_shape", input_shape), ("latent_shape", latent_shape)):
        if not shape or not all(type(s) is int and s >= 1 for s in shape):
            raise VaeEngineError(f"{name} must be a tuple of positive sizes, got {shape!r}")
    return ModelConfig(arch=arch, latent_dim=math.prod(latent_shape), latent_shape=latent_shape,
                       input_shape=input_shape, likelihood=likelihood, prior=prior,
                       imported=to_dict(spec))


def _check_outputs(model: imported.ImportedVAE, cfg: ModelConfig, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the wrapped networks once on real items and check every declared shape: one clear error for each way
    a module can disagree with its declaration."""
    spec = cfg.import_spec
    with torch.no_grad():
        try:
            raw = model.encoder.net(x.reshape(len(x), *cfg.input_shape))
        except Exception as exc:
            raise VaeEngineError(f"the encoder fails on a batch of shape {(len(x), *cfg.input_shape)} "
                                 f"({type(exc).__name__}: {first_line(exc, 200)}); check input_shape") from None
        if not isinstance(raw, (tuple, list)) or len(raw) != 2 or not all(isinstance(t, torch.Tensor) for t in raw):
            raise VaeEngineError("the encoder must return (mean, log-variance), two tensors; got "
                                 f"{type(raw).__name__}")
        for name, t in zip(("mean", "log-variance"), raw, strict=True):
            if tuple(t.shape) != (len(x), *cfg.latent_shape):
                raise VaeEngineError(f"the encoder's {name} has shape {tuple(t.shape)}; latent_shape declares "
                                     f"{(len(x), *cfg.latent_shape)}")
        mu, logvar = model.encoder(x)
        try:
            out = model.decoder.net(mu.reshape(len(x), *cfg.latent_shape) / spec.scaling_factor + spec.shift_factor)
        except Exception as exc:
            raise VaeEngineError(f"the decoder fails on latents of shape {(len(x), *cfg.latent_shape)} "
                                 f"({type(exc).__name__}: {first_line(exc, 200)}); check latent_shape") from None
        if not isinstance(out, torch.Tensor):
            raise VaeEngineError(f"the decoder must return one tensor, got {type(out).__name__}")
        want = graphs.spec("decoder", cfg).outputs[0][1]
        if out[0].numel() != want:
            what = "the reconstruction" if cfg.likelihood == "none" else f"the {cfg.likelihood} likelihood's parameters"
            raise VaeEngineError(f"the decoder returns {out[0].numel()} values per item ({tuple(out.shape[1:])}); "
                                 f"{what} for items of shape {cfg.input_shape} are {want} values")
        recon = model.decoder(mu)
    for name, t in (("mean", mu), ("log-variance", logvar), ("decoder output", recon)):
        if not torch.isfinite(t).all():
            raise VaeEngineError(f"the {name} holds NaN or Inf on real items; check the weights and input_range")
    return mu, logvar, recon


def _write(out: str | os.PathLike, cfg: ModelConfig, model: imported.ImportedVAE, state: dict[str, torch.Tensor],
           step: Callable[[str], None]) -> dict[str, Any]:
    """Check, export and validate both graphs, then write the model folder (nothing is written unless all pass;
    files are staged and renamed into place; a new folder that fails is removed)."""
    t0 = time.perf_counter()
    out = Path(out)
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise ModelDirError(f"the weights hold NaN or Inf values in {k}; refusing to import them")
    # real photos for image models; seeded uniform values in [0, 1) for items of any other shape
    x = torch.from_numpy(sample_photos(cfg.input_shape) if len(cfg.input_shape) == 3 else
                         np.random.default_rng(0).random((2, cfg.input_dim), dtype=np.float32))
    step("check the networks on real items")
    mu, logvar, recon = _check_outputs(model, cfg, x)
    existed = out.exists()
    try:
        with modeldir.lock(out), atomic.temp_dir(out, "import") as scratch:
            _check_new(out)  # again, under the lock: another import may have written one meanwhile
            from safetensors.torch import save

            weights = save(state, metadata={"format": "pt", "source": cfg.import_spec.source})
            sha = hashlib.sha256(weights).hexdigest()  # the graphs record it, as export's do
            built, errors = {}, {}
            inputs = {"encoder": x.numpy(), "decoder": mu.numpy()}
            for role, net in (("encoder", model.encoder), ("decoder", model.decoder)):
                step(f"export and check {role}")
                built[role], errors[role] = checked_graph(net, role, cfg, sha, inputs[role], IMPORT_ATOL, (1, 2))
            report = {"source": cfg.import_spec.origin or cfg.import_spec.source, "opset": graphs.OPSET,
                      "check_items": "scikit-learn's sample photos (china.jpg, flower.jpg), centre-cropped and "
                                     f"resized to {cfg.input_shape[1:]}" if len(cfg.input_shape) == 3 else
                                     "2 rows of seeded uniform values in [0, 1)",
                      "max_abs_err_vs_torch": errors,
                      "reconstruction_mean_abs_err": float((recon - x).abs().mean()) if recon.shape == x.shape
                      else None,
                      "latent_shape": list(cfg.latent_shape), "scaling_factor": cfg.import_spec.scaling_factor,
                      "shift_factor": cfg.import_spec.shift_factor}
            config = {"format": modeldir.FORMAT, "model": to_dict(cfg), "data": {"imported_from": report["source"]},
                      "versions": modeldir.versions()}
            files = {modeldir.WEIGHTS: weights, modeldir.CONFIG: (json.dumps(config, indent=2) + "\n").encode()}
            for role, proto in built.items():
                files[graphs.graph_path(out, role).name] = proto.SerializeToString()
            report["seconds"] = round(time.perf_counter() - t0, 2)
            files[modeldir.EXPORT_REPORT] = (json.dumps(report, indent=2) + "\n").encode()
            atomic.write_files(out, files, scratch)
            return report
    except BaseException:
        if not existed:
            atomic.remove_empty([out])
        raise
