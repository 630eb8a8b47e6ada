"""Each extension point is a registry, and everything downstream follows from its entries: adding a backend, a
likelihood, a prior, a job, an input format or a server operation is one module (or function) plus one registry
line (ARCHITECTURE.md, "Where to add"). These tests walk each registry and check that every entry reaches every
place that must know it, so a new entry that is missed somewhere fails here."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from vae_engine.cli import app
from vae_engine.core import config
from vae_engine.data import readers
from vae_engine.jobs import batch
from vae_engine.model import engine_priors, likelihoods
from vae_engine.modeldir import graphs
from vae_engine.runtime import backends
from vae_engine.serving import oip

from .conftest import TINY_EXPORTED

runner = CliRunner()


def _help(*command: str) -> str:
    r = runner.invoke(app, [*command, "--help"], terminal_width=400)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


@pytest.mark.parametrize("name", list(backends.REGISTRY))
def test_every_backend_reaches_its_paths_the_cli_and_auto(name):
    spec = backends.REGISTRY[name]
    assert spec.paths and all((name, p.precision, p.device) in backends.PATHS for p in spec.paths)
    assert name in backends.BACKENDS and name in _help("encode")  # --backend lists it
    bench_help = _help("bench")  # --backends lists each benchmarked path (help texts are not built from the
    assert all(p.label in bench_help for p in spec.paths if p.label)  # registry: `--help` imports no backend)
    for p in spec.paths:  # `unavailable` answers for every path: None (it runs here) or one line why not
        why = backends.unavailable(name, p.precision, p.device, TINY_EXPORTED)
        assert why is None or (isinstance(why, str) and "\n" not in why)


@pytest.mark.parametrize("name", list(likelihoods.LIKELIHOODS))
def test_every_likelihood_is_declared_where_the_config_and_graphs_read_it(name):
    lk = likelihoods.get(name)
    assert name in config.LIKELIHOODS and config.DECODER_OUTPUTS[name][1] == lk.n_params
    nodes = lk.mean_onnx("params", "mean", 3)
    assert nodes is None or all(isinstance(n, bytes) for n in nodes)
    if name in config.TRAINED_LIKELIHOODS:  # "none" is an imported model's: train never fits it
        assert name in _help("train")  # --likelihood lists it
    params = np.zeros((2, lk.n_params * 3), np.float32)
    assert lk.mean(params).shape == (2, 3)


@pytest.mark.parametrize("name", list(config.PRIORS))
def test_every_prior_has_its_engine_form(name):
    assert set(config.PRIORS) == set(engine_priors.KINDS)
    if name == "none":  # an imported model's: no prior to train
        cfg = config.ModelConfig(arch="modules", prior=name, likelihood="none", imported={})
        assert engine_priors.kind(cfg).name == name and cfg.cannot_score and name not in config.TRAINED_PRIORS
        return
    cfg = config.ModelConfig(prior=name)
    assert engine_priors.kind(cfg).name == name
    assert name in _help("train")  # --prior lists it


@pytest.mark.parametrize("name", list(batch.JOBS))
def test_every_job_has_a_command_an_input_and_an_output_shape(name, tmp_path):
    job = batch.JOBS[name]
    cfg = config.ModelConfig()
    assert isinstance(job.row_shape(cfg, {}), tuple) and job.reads in ("items", "latents", "count")
    assert _help(name)  # a CLI command of the job's name
    source = batch.open_input(name, None if job.reads == "count" else _input(job.reads, cfg, tmp_path), cfg, n=3)
    assert source.n == 3 and source.read(0, 3).shape[0] == 3


def _input(reads: str, cfg, folder):
    path = folder / "in.npy"
    np.save(path, np.zeros((3, cfg.latent_dim if reads == "latents" else cfg.input_dim), np.float32))
    return path


def _write(suffix: str, path):
    x = (np.arange(2 * 28 * 28) % 255).astype(np.uint8).reshape(2, 28, 28)
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        np.savez(path, x=x, y=np.array([1, 2]))
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"items": x}, str(path))
    elif suffix == ".csv":
        np.savetxt(path, x.reshape(2, -1), delimiter=",")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({f"c{i}": x.reshape(2, -1)[:, i] for i in range(784)}), path)
    else:
        from PIL import Image

        Image.fromarray(x[0]).save(path)


@pytest.mark.parametrize("suffix", list(readers.READERS))
def test_every_input_format_reads_as_items(suffix, tmp_path):
    path = tmp_path / f"data{suffix}"
    _write(suffix, path)
    items, _ = readers.read(path)
    assert items.ndim >= 2 and items.shape[0] in (1, 2)
    assert np.prod(items.shape[1:]) == 784


@pytest.mark.parametrize("op", list(oip.OPERATIONS))
def test_every_server_operation_has_a_v1_route_and_a_v2_model(op):
    pytest.importorskip("fastapi")
    from vae_engine.serving.server import create_app

    routes = create_app(TINY_EXPORTED).openapi()["paths"]
    assert f"/v1/{op}" in routes and "post" in routes[f"/v1/{op}"]
    cfg = config.ModelConfig()
    specs = oip.model_specs("m", cfg.input_shape, cfg.latent_shape, detector=True)
    assert f"m-{op}" in specs and specs[f"m-{op}"].op == op


def test_every_graph_variant_has_a_file_name_and_a_backend():
    """A graph variant (`graphs.VARIANTS`) is a file suffix, and a path runs it (the ORT-optimized one is export's
    own check)."""
    run = {p.precision for spec in backends.REGISTRY.values() for p in spec.paths}
    assert all(v in run or v == "optimized" for v in graphs.VARIANTS)
    assert len({graphs.graph_path("m", "encoder", v).name for v in graphs.VARIANTS}) == len(graphs.VARIANTS)
