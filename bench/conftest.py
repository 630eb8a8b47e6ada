"""Benchmark fixtures. A plain `pytest` runs every bench function once, untimed, so the suite cannot rot;
`pytest --benchmark` times them, saves the run and compares it with the previous one (bench/plugin.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vae_engine import modeldir

THREADS = 2  # set explicitly: ORT, torch and Numba threads fight each other on 2 cores


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    timed = ("benchmark_only", "benchmark_enable", "benchmark_suite")  # --benchmark-only, ..., `pytest --benchmark`
    if not any(config.getoption(name, False) for name in timed):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory) -> Path:
    """The shipped model when present (exported fp32 + int8); else the default architecture, randomly
    initialized and exported (speed does not depend on the weights)."""
    shipped = Path(__file__).resolve().parent.parent / "models" / "mnist-vae"
    needed = ("encoder.onnx", "decoder.onnx", "encoder.int8.onnx", "decoder.int8.onnx")
    if all((shipped / n).is_file() for n in needed):
        return shipped
    from vae_engine.core.config import ModelConfig, TrainConfig
    from vae_engine.export.exporter import export
    from vae_engine.model.networks import VAE

    out = tmp_path_factory.mktemp("bench") / "model"
    out.mkdir()
    torch.manual_seed(0)
    model = VAE(ModelConfig())
    modeldir.write_config(out, model.cfg, TrainConfig(), {"name": "random-init"})
    modeldir.save_weights(out, model)
    export(out, quantize="int8")
    return out


@pytest.fixture(scope="session")
def engines(bench_model):
    """One engine per backend label, loaded once (torch.compile compiles on first use)."""
    from vae_engine.runtime.bench import BY_LABEL, load_candidate

    return {label: load_candidate(bench_model, BY_LABEL[label], THREADS)
            for label in ("torch", "torch-compile", "ort-fp32", "ort-int8")}


