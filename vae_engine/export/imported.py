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
from ..core.errors import DataError, ExportError, ModelDirError, VaeEngineError, first_line, missing_dependency
from ..data.datasets import sample_photos
from ..model import imported
from ..modeldir import graphs
from .tracing import checked_graph, optimized_graph, set_metadata

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


CALIBRATION_PHOTOS = 4  # crops of the sample photos other than the PHOTO_ITEMS the budget is judged on, + mirrors
CALIBRATION_ROWS = 16  # seeded rows for models whose items are not images
SPEEDUP_TO_KEEP = 1.05  # a graph keeps its int8 layers only if they make it at least this much faster than fp32
# layer sets tried per graph (each: both graphs reconstruct the validation items; ~10 s for the SD VAE at 256x256)
MAX_TRIALS = 16


def export_variants(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, optimize: bool = False,
                    quantize: str | None = None, fp16: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """An imported model's optimized and int8 graphs, made from its fp32 graphs (which `import` checked against
    PyTorch), written beside them with their measured cost in export_report.json; returns the report.

    int8 (`export --quantize int8` on an imported folder): static QDQ layers (`qdq.py`), calibrated on photos (or
    seeded rows) the accuracy budget is not judged on, the layer set grown while the pair keeps `--precision
    auto`'s budget (nats where the model has a likelihood, else the mean reconstruction change), and a graph whose
    int8 layers do not make it faster kept in fp32."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir
    if fp16:
        raise VaeEngineError("--fp16: half-precision graphs are not made for imported models; on a GPU "
                             "--backend torch --precision fp16 runs an AutoencoderKL")
    if not optimize and quantize is None:
        raise VaeEngineError(f"{model_dir}: an imported model; `vae-engine import` exported and checked its fp32 "
                             "graphs: ask for --quantize int8 or --optimize")
    cfg = modeldir.model_config(model_dir)
    sha = modeldir.weights_sha256(model_dir)
    fp32 = {role: graphs.load_graph(graphs.graph_path(model_dir, role), role, cfg).proto() for role in graphs.ROLES}
    path = model_dir / modeldir.EXPORT_REPORT
    try:  # import's report, which the variants' sections join; a damaged one is written anew
        report = modeldir.read_json(path, "export report") if path.is_file() else {}
    except ModelDirError:
        report = {}
    report = report if isinstance(report, dict) else {}
    step = progress or (lambda message: None)
    step("run the encoder on the calibration items")
    feeds, source = calibration_feeds(fp32, cfg)
    existed = out_dir.exists()
    try:
        with modeldir.lock(out_dir), atomic.temp_dir(out_dir, "export") as scratch:
            built: dict[tuple[str, str], Any] = {}
            if optimize:
                errors = {}
                for role in graphs.ROLES:
                    step(f"optimized {role}")
                    built[role, "optimized"] = proto = optimized_graph(fp32[role], scratch)
                    set_metadata(proto, role, "optimized", cfg, sha)
                    errors[role] = _difference(fp32[role], proto, feeds[role][0], f"{role}.opt.onnx")
                report["optimized"] = {"max_abs_err_vs_fp32": errors}
            report.pop("warnings", None)
            if quantize:
                protos, report["int8"] = _int8(fp32, model_dir, cfg, feeds, source, scratch, step)
                report["warnings"] = report["int8"].get("warnings", [])
                for role, proto in protos.items():
                    set_metadata(proto, role, "int8", cfg, sha)
                    built[role, "int8"] = proto
            files: dict[str, bytes] = {}
            if out_dir.resolve() != model_dir.resolve():  # a complete model folder
                names = [*modeldir.INFERENCE_FILES, *(graphs.graph_path(model_dir, r).name for r in graphs.ROLES)]
                files.update({n: (model_dir / n).read_bytes() for n in names if (model_dir / n).exists()})
            for (role, variant), proto in built.items():
                files[graphs.graph_path(out_dir, role, variant).name] = proto.SerializeToString()
            report["variants_seconds"] = round(time.perf_counter() - t0, 2)
            files[modeldir.EXPORT_REPORT] = (json.dumps(report, indent=2) + "\n").encode()
            atomic.write_files(out_dir, files, scratch)
            if quantize and not report["int8"]["accuracy"]:  # none kept: an earlier export's are stale now
                for role in graphs.ROLES:
                    graphs.graph_path(out_dir, role, "int8").unlink(missing_ok=True)
            return report
    except BaseException:
        if not existed:
            atomic.remove_empty([out_dir])
        raise


def _calibration_items(cfg: ModelConfig) -> tuple[np.ndarray, str]:
    """Items the int8 activation ranges are measured on, none of them one the budget is judged on: (x, source)."""
    from ..runtime.tuning import PHOTO_ITEMS

    if cfg.image_shape is None:
        x = np.random.default_rng(1).random((CALIBRATION_ROWS, cfg.input_dim), dtype=np.float32)
        return x, f"{CALIBRATION_ROWS} rows of seeded uniform values in [0, 1)"
    crops = sample_photos(cfg.image_shape, PHOTO_ITEMS + CALIBRATION_PHOTOS)[PHOTO_ITEMS:]
    mirrored = crops.reshape(len(crops), *cfg.image_shape)[..., ::-1].reshape(len(crops), -1)
    return (np.concatenate([crops, mirrored]),
            f"{2 * len(crops)} crops of scikit-learn's sample photos and their mirror images (other crops than the "
            f"{PHOTO_ITEMS} the accuracy is measured on)")


def calibration_feeds(fp32: dict[str, Any], cfg: ModelConfig) -> tuple[dict[str, list[dict[str, np.ndarray]]], str]:
    """The calibration items as one feed per item for each graph, and where they come from: the items for the
    encoder, their latents (the posterior mean, what decode and reconstruct give the decoder) for the decoder.
    One item a call: a large image's activations are large."""
    x, source = _calibration_items(cfg)
    enc_in, dec_in = (graphs.spec(role, cfg).inputs[0][0] for role in graphs.ROLES)
    sess = graphs.make_session(fp32["encoder"])
    mu = [sess.run(["mu"], {enc_in: x[i:i + 1]})[0] for i in range(len(x))]
    return {"encoder": [{enc_in: x[i:i + 1]} for i in range(len(x))], "decoder": [{dec_in: m} for m in mu]}, source


def _difference(reference: Any, graph: Any, feed: dict[str, np.ndarray], name: str) -> float:
    """The largest difference of a variant's outputs from the fp32 graph's, per unit of each output's scale."""
    got = graphs.make_session(graph).run(None, feed)
    want = graphs.make_session(reference).run(None, feed)
    worst = max(float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w)))) for g, w in zip(got, want,
                                                                                                 strict=True))
    if not np.isfinite(worst) or worst > IMPORT_ATOL:
        raise ExportError(f"{name}: differs from the fp32 graph by {worst:.3g} of the output's scale "
                          f"(tolerance {IMPORT_ATOL:g})")
    return worst


def _speedup(fp32: Any, int8: Any, feed: dict[str, np.ndarray], threads: int, rounds: int = 3) -> float:
    """How many times faster the int8 graph runs one item than the fp32 graph: the median of interleaved rounds
    (the machine's load moves both alike)."""
    from ..perf.timing import measure

    runs = [graphs.make_session(g, threads=threads) for g in (fp32, int8)]
    ratios = []
    for _ in range(rounds):
        t32, t8 = (float(np.median(measure(lambda s=s: s.run(None, feed), min_time=0.2, warmup=1,
                                           min_repeats=2).seconds)) for s in runs)
        ratios.append(t32 / t8)
    return float(np.median(ratios))


class _Int8Search:
    """The int8 layer search of one imported model: each candidate pair of graphs is written into a scratch model
    folder and judged by tuning's own accuracy against the fp32 reference (what `--precision auto` measures);
    every set tried is kept as a row of the report."""

    def __init__(self, fp32: dict[str, Any], tensor_ranges: dict[str, Any], model_dir: Path, scratch: Path,
                 threads: int, step: Callable[[str], None]):
        from ..runtime import tuning
        from ..runtime.engine import Engine

        self.fp32, self.ranges, self.threads, self.step = fp32, tensor_ranges, threads, step
        step("accuracy: fp32 reference")
        self.ref = tuning.reference(Engine.load, model_dir, threads, "onnxruntime")
        self.folder = scratch / "int8-candidate"
        self.folder.mkdir()
        for name in modeldir.INFERENCE_FILES:
            if (model_dir / name).exists():
                atomic.write_bytes(self.folder / name, (model_dir / name).read_bytes())
        self.rows: list[dict[str, Any]] = []
        self.written: dict[str, tuple[str, ...] | None] = {role: None for role in graphs.ROLES}
        self.trials = {role: 0 for role in graphs.ROLES}

    def graph(self, role: str, layers: list[str]) -> Any:
        from . import qdq

        return qdq.quantize(self.fp32[role], self.ranges[role], layers)

    def score(self, chosen: dict[str, list[str]]) -> dict[str, Any]:
        """One candidate's accuracy row (both graphs with these int8 layers)."""
        from ..runtime import tuning
        from ..runtime.engine import Engine

        for role in graphs.ROLES:  # quantize (seconds on a large graph) only the graph whose set changed
            if self.written[role] != tuple(chosen[role]):
                proto = self.graph(role, chosen[role])
                atomic.write_bytes(graphs.graph_path(self.folder, role, "int8"), proto.SerializeToString())
                self.written[role] = tuple(chosen[role])
        engine = Engine.load(self.folder, backend="onnxruntime", precision="int8", threads=self.threads)
        row = {"int8_layers": {role: len(chosen[role]) for role in graphs.ROLES}, **tuning.accuracy(engine, self.ref)}
        row["within_budget"] = tuning.within({"precision": "int8", **row}, tuning.DEFAULT_BUDGET)
        self.rows.append(row)
        self.step(f"int8: {row['int8_layers']['encoder']} + {row['int8_layers']['decoder']} layers, "
                  f"{tuning.cost_text(row)}")
        return row

    def grow(self, chosen: dict[str, list[str]], role: str, layers: list[str]) -> list[str]:
        """`role`'s int8 layers, grown within the budget with the other graph's as chosen (`qdq.grow`), at most
        MAX_TRIALS sets tried: layers not reached stay fp32."""
        from . import qdq

        def fits(trial: list[str]) -> bool:
            if self.trials[role] >= MAX_TRIALS:
                return False
            self.trials[role] += 1
            return self.score({**chosen, role: trial})["within_budget"]

        return qdq.grow([], layers, fits)


def _int8(fp32: dict[str, Any], model_dir: Path, cfg: ModelConfig, feeds: dict[str, list], source: str,
          scratch: Path, step: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The int8 graphs to keep and their report: calibrate once, grow each graph's layer set within the budget
    (encoder first: every job encodes or decodes once a call, so neither graph is favoured by a scoring loop),
    then keep a graph's int8 layers only where they make it faster."""
    from ..core import hardware
    from ..runtime import tuning
    from . import qdq

    threads = hardware.available_cpus()
    step("int8 calibration")
    tensor_ranges = {role: qdq.ranges(fp32[role], feeds[role], scratch) for role in graphs.ROLES}
    names = {role: qdq.layers(fp32[role]) for role in graphs.ROLES}
    if not any(names.values()):
        raise ExportError("--quantize int8: this model has no Conv, ConvTranspose, Gemm or MatMul layer with "
                          "constant weights to quantize; export without --quantize")
    search = _Int8Search(fp32, tensor_ranges, model_dir, scratch, threads, step)
    chosen: dict[str, list[str]] = {role: [] for role in graphs.ROLES}
    for role in graphs.ROLES:
        chosen[role] = search.grow(chosen, role, names[role])
    speedup = {}
    for role in graphs.ROLES:
        if chosen[role]:
            step(f"int8: time the {role} against fp32")
            speedup[role] = round(_speedup(fp32[role], search.graph(role, chosen[role]), feeds[role][0], threads), 3)
            if speedup[role] < SPEEDUP_TO_KEEP:
                chosen[role] = []
    final = search.score(chosen) if any(chosen.values()) else None
    report = {"method": "ONNX Runtime static QDQ: uint8 activations (MinMax ranges), int8 per-channel 7-bit weights",
              "calibration": source, "validation": search.ref["source"], "threads": threads,
              "budget": tuning.budget_text({"budget": "reconstruction"} if tuning.by_reconstruction(cfg) else
                                           {"key": {"budget_nats": tuning.DEFAULT_BUDGET}}),
              "layers": {role: len(names[role]) for role in graphs.ROLES},
              "trials": search.trials, "max_trials": MAX_TRIALS,
              "int8_layers": {role: chosen[role] for role in graphs.ROLES},
              "speedup_vs_fp32_one_item": speedup, "speedup_to_keep": SPEEDUP_TO_KEEP,
              "accuracy": final and {k: v for k, v in final.items() if k != "int8_layers"}, "candidates": search.rows}
    if final is None:  # nothing to gain: no int8 graphs, so --precision auto does not time a copy of fp32
        report["warnings"] = [f"no int8 layers are both within {report['budget']} and faster than fp32 here "
                              f"(speed-up kept: {SPEEDUP_TO_KEEP}x); no int8 graphs written"]
        return {}, report
    if not final["within_budget"]:  # the set grew within the budget; without a graph's layers it measured over
        report["warnings"] = [f"the int8 graphs measured over {report['budget']} ({tuning.cost_text(final)}); "
                              "--precision auto will not choose them"]
    return {role: search.graph(role, chosen[role]) for role in graphs.ROLES}, report
