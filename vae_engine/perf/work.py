"""How much arithmetic a model does: FLOPs per item of the encoder and decoder, and the multiply-adds of each
network by the precision a path runs them in (an int8 graph keeps some layers in fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import ModelConfig
from ..modeldir import graphs

if TYPE_CHECKING:  # torch counts the work of models without exported graphs; exported ones are counted on ONNX
    import torch


def _layer_flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    """2 * multiply-adds of the Linear/Conv layers of `module` for one input row, counted with forward hooks."""
    import torch

    total = [0.0]

    def hook(m, inputs, output):
        if isinstance(m, torch.nn.Linear):
            total[0] += 2.0 * m.in_features * m.out_features * output.shape[0]
        elif isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            kh, kw = m.kernel_size
            spatial = (output if isinstance(m, torch.nn.Conv2d) else inputs[0]).shape
            total[0] += 2.0 * m.in_channels * m.out_channels * kh * kw * spatial[0] * spatial[2] * spatial[3]

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total[0] / x.shape[0]


def model_flops(cfg: ModelConfig, model_dir: Path | None = None) -> dict[str, float]:
    """FLOPs per sample of the encoder and decoder (2 per multiply-add; activations not counted): counted on the
    exported fp32 graphs of `model_dir` where it has them (no PyTorch needed; an imported model always does),
    else on the trainer's networks."""
    if model_dir is not None and all(graphs.graph_path(model_dir, r).is_file() for r in graphs.ROLES):
        enc, dec = (2.0 * graphs.graph_macs(graphs.load_graph(graphs.graph_path(model_dir, r), r, cfg))["float"]
                    for r in graphs.ROLES)
        return {"encode": enc, "decode": dec, "reconstruct": enc + dec}
    import torch

    from ..model.networks import VAE

    vae = VAE(cfg)
    enc = _layer_flops(vae.encoder, torch.rand(2, cfg.input_dim))
    dec = _layer_flops(vae.decoder, torch.rand(2, cfg.latent_dim))
    return {"encode": enc, "decode": dec, "reconstruct": enc + dec}


def macs_by_precision(model_dir: Path, cfg: ModelConfig, role: str, precision: str, backend: str) -> dict:
    """Multiply-adds per item of one network ("encoder" or "decoder") by the precision they run in on a path:
    all of them at the path's precision, except that an int8 ONNX graph runs its integer layers in int8 and the rest
    (kept layers, convolutions) in fp32. {precision: multiply-adds}."""
    fp32_graph = graphs.graph_path(model_dir, role, "fp32")
    if fp32_graph.is_file():  # counted on the exported graph: no PyTorch needed
        total = float(graphs.graph_macs(graphs.load_graph(fp32_graph, role, cfg))["float"])
    else:
        total = model_flops(cfg)["encode" if role == "encoder" else "decode"] / 2
    if backend != "onnxruntime" or precision != "int8":
        return {precision: total}
    int8 = graphs.graph_macs(graphs.load_graph(graphs.graph_path(model_dir, role, "int8"), role, cfg))["int8"]
    return {"int8": int8, "fp32": max(total - int8, 0.0)}
