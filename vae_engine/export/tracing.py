"""A network traced to one checked ONNX graph: the dynamo exporter, the graph's metadata (tying it to the weights),
onnx.checker, and ONNX Runtime against PyTorch within a tolerance of each output's scale. Export (the trainer's
models) and import (pretrained ones) both build their graphs here."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..core.config import ModelConfig, to_dict
from ..core.errors import ExportError, first_line
from ..modeldir import graphs


def trace(net: torch.nn.Module, role: str, cfg: ModelConfig) -> onnx.ModelProto:
    """Trace one graph with a dynamic batch axis (example batch 2, so the exporter cannot specialize it).

    We use the dynamo exporter (torch.export + onnxscript): for this model it emits the minimal graph
    (Gemm/Relu/Split/Clip) where the TorchScript exporter adds a Shape/Gather/Slice chain for `chunk`, and it is
    the exporter torch maintains.
    """
    sp = graphs.spec(role, cfg)
    (name, features), = sp.inputs
    example = (torch.rand(2, features),)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    try:
        with warnings.catch_warnings(), quiet[0], quiet[1]:
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                net, example, input_names=[name], output_names=[n for n, _ in sp.outputs],
                opset_version=graphs.OPSET, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False, verbose=False,
            )
    except Exception as exc:
        # the exporter wraps whatever stops it, Ctrl-C included, in its own error with a long report
        cause = exc
        while cause is not None:
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            cause = cause.__cause__ or cause.__context__
        first = first_line(exc)
        raise ExportError(f"{role}: torch.onnx.export failed ({first})") from None
    if program is None:
        raise ExportError(f"{role}: torch.onnx.export returned no program")
    return program.model_proto


def set_metadata(model: onnx.ModelProto, role: str, variant: str, cfg: ModelConfig, weights_sha: str) -> None:
    from ..core.config import VERSION as __version__

    sp = graphs.spec(role, cfg)
    props = {
        "vae_engine.version": __version__, "vae_engine.role": role, "vae_engine.variant": variant,
        "vae_engine.model_config": json.dumps(to_dict(cfg)), "vae_engine.weights_sha256": weights_sha,
        "vae_engine.inputs": json.dumps([list(i) for i in sp.inputs]),
        "vae_engine.outputs": json.dumps([list(o) for o in sp.outputs]),
        "vae_engine.input_shape": json.dumps([-1, cfg.input_dim]),  # the graph's input: items flattened
        "vae_engine.item_shape": json.dumps(list(cfg.input_shape)),  # one item before flattening
        "vae_engine.latent_shape": json.dumps(list(cfg.latent_shape)),  # one item's latent before flattening
        "vae_engine.likelihood": cfg.likelihood,  # how to read the decoder's output (see likelihoods/)
    }
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def optimized_graph(model: onnx.ModelProto, tmp_dir: Path) -> onnx.ModelProto:
    """The graph after ONNX Runtime's own optimizations (ORT_ENABLE_ALL), as ORT saves it."""
    path = tmp_dir / "opt.onnx"
    graphs.make_session(model, threads=1, optimized_path=str(path))
    out = onnx.load(path)
    path.unlink()
    return out


def run(model: onnx.ModelProto, feed: np.ndarray, threads: int | None = None) -> list[np.ndarray]:
    sess = graphs.make_session(model, threads=threads)
    return sess.run(None, {sess.get_inputs()[0].name: feed})


def validate(model: onnx.ModelProto, net: torch.nn.Module, inputs: np.ndarray, atol: float, name: str,
              batches: tuple[int, ...] = (1, 37)) -> float:
    """ORT vs PyTorch at batch 1 and an odd batch (37; an imported image model: 1 and 2); raise ExportError beyond
    `atol` times each output's scale
    (its largest magnitude, at least 1): float rounding grows with the values, so a Gaussian decoder's outputs of
    order 10 differ by ~1e-4 where logits of order 1 differ by ~1e-5. Returns the largest scaled error."""
    worst = 0.0
    for batch in batches:
        x = inputs[:batch]
        with torch.no_grad():
            ref = net(torch.from_numpy(x))
        ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        got = run(model, x)
        for r, g in zip(ref, got, strict=True):
            if g.shape != r.shape:
                raise ExportError(f"{name}: ONNX Runtime output shape {g.shape} != PyTorch {r.shape} at batch {batch}")
            scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
            worst = max(worst, float(np.max(np.abs(g - r))) / scale if r.size else 0.0)
    if not np.isfinite(worst) or worst > atol:
        raise ExportError(f"{name}: ONNX Runtime differs from PyTorch by {worst:.3g} of the output's scale "
                          f"(tolerance {atol:g})")
    return worst


def checked_graph(net: torch.nn.Module, role: str, cfg: ModelConfig, sha: str, inputs: np.ndarray, atol: float,
                  batches: tuple[int, ...] = (1, 37)) -> tuple[onnx.ModelProto, float]:
    """One network's fp32 graph, checked: exported, its metadata set (tied to the weights' `sha`), onnx.checker,
    then against PyTorch within `atol` (`validate`). Returns (graph, its largest scaled error)."""
    proto = trace(net, role, cfg)
    set_metadata(proto, role, "fp32", cfg, sha)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{role}: exported graph fails onnx.checker ({first_line(exc)})") from None
    return proto, validate(proto, net, inputs, atol, f"{role}.onnx", batches)
