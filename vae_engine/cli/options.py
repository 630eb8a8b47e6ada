"""Options shared by several commands (Typer `Annotated` types), each with the help text `--help` shows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import VaeEngineError

BudgetOpt = Annotated[float, typer.Option(help="With --precision auto: the largest change of the mean NLL and mean -ELBO (nats, against fp32 on the model's validation items) a faster path may cost.")]

ModelDir = Annotated[Path, typer.Argument(help="Model directory (config.json + model.safetensors, as written by train).")]
ModelOpt = Annotated[Path | None, typer.Argument(help="Model directory; default: the shipped models/mnist-vae.", show_default=False)]

BackendOpt = Annotated[str, typer.Option(help="auto, torch, torch-compile, onnxruntime or openvino (pip install 'vae-engine\\[openvino]'). auto with --precision auto: the fastest measured path; with a fixed precision: on the CPU ONNX Runtime if exported, else torch; torch on a GPU.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (the first CUDA GPU torch sees, else the CPU); torch, and onnxruntime with onnxruntime-gpu. A GPU that is not usable here is an error, not a quiet run on the CPU.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto: the fastest path measured here within --max-nll-change of fp32 (decided once per machine and batch size, saved in MODEL/tuning.json, shown by info); fp32; bf16 (torch, or openvino on CPUs with AVX512_BF16/AMX); int8 (onnxruntime; export --quantize int8); fp16 (GPU).")]
BatchOpt = Annotated[int, typer.Option(help="Items per chunk: memory stays bounded by this, whatever the input size.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="Threads for torch, ONNX Runtime and Numba (default: all cores).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of every random draw; results depend on it and the item index only.")]
InputOpt = Annotated[Path, typer.Option("--input", "-i", help="The model's items: .npy (N, *item_shape) or flattened (N, D) (uint8 0..255 or float), .npz, .safetensors, .csv, .parquet, IDX(.gz), one PNG/JPEG image or a folder of them, of the model's size.")]
FitOpt = Annotated[bool, typer.Option(help="Image inputs of another size: scale each to cover the model's size and centre-crop it (aspect ratio kept); without it they must be the model's size.")]


RayOpt = Annotated[str | None, typer.Option("--ray", help="Run on Ray Data: 'local' starts a local Ray, or give a cluster address (ray://host:10001, auto). Needs the 'distributed' extra.")]
ActorsOpt = Annotated[int, typer.Option(help="With --ray: number of engine actors (each loads the model once).")]
CpusOpt = Annotated[int, typer.Option(help="With --ray: CPUs per actor; ONNX Runtime intra-op threads are matched to it.")]


def comma_list(option: str, text: str | None, cast: type = str) -> tuple | None:
    """An option's comma-separated value as a tuple of `cast` values (None when not given); one clear error."""
    if not text:
        return None
    try:
        return tuple(cast(t.strip()) for t in text.split(",") if t.strip())
    except ValueError:
        kind = "integers" if cast is int else "numbers" if cast is float else "values"
        raise VaeEngineError(f"{option} must be comma-separated {kind}, got {text!r}") from None
