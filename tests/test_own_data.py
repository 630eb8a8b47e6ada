"""Your own data: likelihoods against torch.distributions and their twins, any item shape through every stage,
the change-of-variables term, readers' round trips, and bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vae_engine import modeldir
from vae_engine.cli import app
from vae_engine.core import rng
from vae_engine.core.config import TRAINED_LIKELIHOODS, ModelConfig, TrainConfig, from_dict
from vae_engine.core.errors import DataError, VaeEngineError
from vae_engine.data import readers
from vae_engine.export.exporter import export
from vae_engine.model import kernels, likelihoods
from vae_engine.model.estimators import iwae_bound, log_weights
from vae_engine.model.networks import VAE
from vae_engine.model.posterior import gaussian_log_prob, standard_normal_log_prob
from vae_engine.runtime.engine import Engine
from vae_engine.training.train import train

from .conftest import one_line_error

pytestmark = pytest.mark.slow  # ~1 min: trains one small model per likelihood x architecture

runner = CliRunner()
LIKELIHOODS = list(TRAINED_LIKELIHOODS)  # what the trainer fits ("none" is an imported model's)


def _data_for(name: str, g: np.random.Generator, shape: tuple) -> np.ndarray:
    if name == "bernoulli":
        return (g.random(shape) < 0.4).astype(np.float32)
    if name == "continuous-bernoulli":
        return g.random(shape).astype(np.float32)
    return (g.standard_normal(shape) * 3 + 1).astype(np.float32)


def _params_for(lk, g: np.random.Generator, shape: tuple) -> np.ndarray:
    p = (g.standard_normal((*shape[:-1], lk.n_params * shape[-1])) * 2).astype(np.float32)
    if lk.name == "continuous-bernoulli":  # exercise the series branch at and near logit 0
        p[..., :4] = [0.0, 1e-5, -4e-3, 9e-3]
    return p


def _torch_distribution(lk, params: torch.Tensor):
    d = torch.distributions
    if lk.name == "bernoulli":
        return d.Bernoulli(logits=params)
    if lk.name == "continuous-bernoulli":
        return d.ContinuousBernoulli(logits=params)
    mean, logvar = params.chunk(2, dim=-1)
    return d.Normal(mean, torch.exp(0.5 * logvar))


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_log_prob_matches_torch_distributions(name):
    lk = likelihoods.get(name)
    g = np.random.default_rng(0)
    x = _data_for(name, g, (6, 30))
    params = _params_for(lk, g, (6, 30))
    xt, pt = torch.from_numpy(x).double(), torch.from_numpy(params).double()
    ref = _torch_distribution(lk, pt).log_prob(xt).sum(-1)
    # float64 on both sides; torch's continuous Bernoulli uses a Taylor series in a band around p = 0.5, ours
    # around logit 0, so the two agree to ~1e-6 there and to float64 rounding elsewhere
    torch.testing.assert_close(lk.log_prob(xt, pt), ref, rtol=1e-9, atol=1e-5)
    np.testing.assert_allclose(lk.log_prob_numpy(x, params), ref.numpy(), rtol=1e-9, atol=1e-5)
    if name != "bernoulli":  # E[x|z]: the distribution's mean (bernoulli's is the sigmoid, tested elsewhere)
        np.testing.assert_allclose(lk.mean(params), _torch_distribution(lk, pt).mean.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_numba_kernels_match_numpy_twins(name):
    lk = likelihoods.get(name)
    g = np.random.default_rng(1)
    b, k, d, features = 5, 7, 3, 40
    x = _data_for(name, g, (b, features))
    params = _params_for(lk, g, (b, k, features))
    mu, logvar = g.standard_normal((b, d)).astype(np.float32), (g.standard_normal((b, d)) * 0.5).astype(np.float32)
    z = kernels.reparameterize(mu, logvar, rng.normal_eps(0, 0, b, k, d))
    # float32 kernels against float64 twins: sums of 40 terms of size ~1-50 agree to ~1e-6 relative
    np.testing.assert_allclose(kernels.log_weights(x, params, z, mu, logvar, lk),
                               kernels.log_weights_numpy(x, params, z, mu, logvar, lk), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(kernels.log_prob_rows(x, params[:, 0], lk), lk.log_prob_numpy(x, params[:, 0]),
                               rtol=2e-5, atol=2e-4)
    with pytest.raises(ValueError, match="do not fit"):  # the kernels never see mismatched shapes
        kernels.log_weights(x[:, :-1], params, z, mu, logvar, lk)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_iwae_with_one_sample_is_the_elbo_estimate(name):
    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim=3, hidden=(16,), input_shape=(12,), likelihood=name,
                            standardize=name == "gaussian")).double()
    x = torch.from_numpy(_data_for(name, np.random.default_rng(2), (4, 12))).double()
    eps = torch.randn(4, 1, 3, dtype=torch.float64)  # (B, K, L)
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, eps)[:, 0]
    estimate = model.likelihood.log_prob(x, model.decode(z)) + standard_normal_log_prob(z) \
        - gaussian_log_prob(z, mu, logvar)
    torch.testing.assert_close(iwae_bound(log_weights(model, x, eps)), estimate)
    # and its mean over many samples is the analytic-KL ELBO on the same eps: only the KL term is estimated
    # (its Monte Carlo error over 20000 samples of a 3-D Gaussian is ~0.02 nats)
    eps = torch.randn(4, 20000, 3, dtype=torch.float64)
    from vae_engine.model.estimators import elbo

    torch.testing.assert_close(log_weights(model, x, eps).mean(-1), elbo(model, x, eps), rtol=0, atol=0.1)


def _cfg(path, **kw) -> TrainConfig:
    return TrainConfig(**{"data": str(path), "batch_size": 16, "seed": 1, "epochs": 2, **kw})


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """Tiny models, one per likelihood (a table, grey images, RGB images with conv at 12x10), exported."""
    root = tmp_path_factory.mktemp("own")
    g = np.random.default_rng(3)
    table = (g.standard_normal((160, 3)) @ g.standard_normal((3, 12)) * 4 + 50).astype(np.float32)
    grey = g.random((160, 9, 7)).astype(np.float32)
    rgb = (g.random((160, 3, 12, 10)) * 255).astype(np.uint8)
    specs = {
        "gaussian": (table, ModelConfig(latent_dim=2, hidden=(16,), likelihood="gaussian")),
        "continuous-bernoulli": (grey, ModelConfig(latent_dim=2, hidden=(16,), likelihood="continuous-bernoulli")),
        "bernoulli-conv": (rgb, ModelConfig(arch="conv", latent_dim=2, hidden=(16,), likelihood="bernoulli")),
        "gaussian-conv": (rgb, ModelConfig(arch="conv", latent_dim=2, hidden=(16,), likelihood="gaussian")),
        # the ResNet arch and the VampPrior with the likelihoods other than Bernoulli
        "continuous-bernoulli-resnet-vamp": (grey, ModelConfig(arch="resnet", latent_dim=2, hidden=(16,),
                                                               likelihood="continuous-bernoulli", prior="vamp",
                                                               pseudo_inputs=5)),
        "gaussian-vamp": (table, ModelConfig(latent_dim=2, hidden=(16,), likelihood="gaussian", prior="vamp",
                                             pseudo_inputs=5)),
    }
    out = {}
    for name, (arr, model_cfg) in specs.items():
        np.save(root / f"{name}.npy", arr)
        folder = root / f"m-{name}"
        train(model_cfg, _cfg(root / f"{name}.npy"), folder, plots=True)
        export(folder)
        out[name] = (folder, root / f"{name}.npy")
    return out


@pytest.mark.parametrize("name", ["gaussian", "continuous-bernoulli", "bernoulli-conv", "gaussian-conv",
                                  "continuous-bernoulli-resnet-vamp", "gaussian-vamp"])
def test_every_stage_follows_the_spec(own_models, name, tmp_path):
    folder, data = own_models[name]
    cfg = modeldir.model_config(folder)
    table = name.startswith("gaussian") and "conv" not in name
    assert cfg.input_shape == ((12,) if table else (1, 9, 7) if "continuous" in name else (3, 12, 10))
    assert cfg.standardize == cfg.likelihood.startswith("gaussian")
    x = np.load(data)[:9]
    onnx_engine, torch_engine = (Engine.load(folder, backend=b, threads=1) for b in ("onnxruntime", "torch"))
    # ONNX Runtime vs PyTorch on the same eps streams: the same numbers up to float32 summation order
    np.testing.assert_allclose(onnx_engine.log_likelihood(x, k=16, seed=2),
                               torch_engine.log_likelihood(x, k=16, seed=2), rtol=1e-4, atol=1e-3)
    recon = onnx_engine.reconstruct(x)
    assert recon.shape == (9, cfg.input_dim) and np.isfinite(recon).all()
    mu = torch_engine.encode(x)[0]  # E[x|z]: ONNX Runtime's graphs end in the likelihood's mean (or NumPy's after)
    for got, want in ((recon, torch_engine.reconstruct(x)), (onnx_engine.decode(mu), torch_engine.decode(mu))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    report = json.loads((folder / modeldir.EXPORT_REPORT).read_text())
    assert report["test_images"] == 16  # its own 10% split of 160 items, not MNIST
    # the export's check of its fp32 graphs and the trainer's last test -ELBO: one estimator (same items, same
    # seed-0 binarization and eps streams), ONNX Runtime against PyTorch: equal up to float32 summation order
    assert report["test_nelbo_fp32"] == pytest.approx(modeldir.read_metrics(folder)[-1]["test_nelbo"], rel=1e-4,
                                                      abs=1e-3)
    plots = {p.name for p in (folder / "plots").iterdir()}
    assert plots >= ({"features.png", "latent.png"} if cfg.image_shape is None
                     else {"reconstructions.png", "samples.png"})
    out = tmp_path / "r.npy"
    assert runner.invoke(app, ["reconstruct", str(folder), "-i", str(data), "-o", str(out)]).exit_code == 0
    assert np.load(out).shape == (160, cfg.input_dim)
    result = runner.invoke(app, ["evaluate", str(folder), "--k", "8", "--backend", "onnxruntime", "--json",
                                 str(tmp_path / "ev.json")])
    assert result.exit_code == 0, result.output
    assert math.isfinite(json.loads((tmp_path / "ev.json").read_text())["test_nll"])


def test_nll_is_in_raw_units_change_of_variables(tmp_path):
    """Training on x and on 10 x with the same seed gives the same network (inputs are standardized); the NLL
    of 10 x is then the NLL of x plus D log 10 per item: the -sum log std term."""
    g = np.random.default_rng(4)
    x = (g.standard_normal((200, 3)) @ g.standard_normal((3, 8)) + 2).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x10.npy", 10 * x)
    cfg = ModelConfig(latent_dim=2, hidden=(16,), likelihood="gaussian")
    for name in ("x", "x10"):
        train(cfg, _cfg(tmp_path / f"{name}.npy", epochs=1), tmp_path / f"m-{name}", plots=False)
    a = Engine.load(tmp_path / "m-x", backend="torch", threads=1).log_likelihood(x[:20], k=32, seed=0)
    b = Engine.load(tmp_path / "m-x10", backend="torch", threads=1).log_likelihood(10 * x[:20], k=32, seed=0)
    # -log p(10 x) = -log p(x) + D log 10; float32 training of two runs agrees to ~1e-3 nats here
    np.testing.assert_allclose(-b, -a + 8 * math.log(10.0), atol=0.05)


def test_readers_round_trip(tmp_path):
    from PIL import Image

    g = np.random.default_rng(5)
    table = g.standard_normal((7, 4)).astype(np.float32)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "c", "d"])
        writer.writerows(table.tolist())
    np.testing.assert_allclose(readers.read(tmp_path / "t.csv")[0], table, rtol=1e-6)
    np.testing.assert_allclose(readers.read(tmp_path / "t.csv", columns=["b", "d"])[0], table[:, [1, 3]], rtol=1e-6)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({n: table[:, i] for i, n in enumerate("abcd")}), tmp_path / "t.parquet")
    np.testing.assert_array_equal(readers.read(tmp_path / "t.parquet")[0], table)
    np.savez(tmp_path / "t.npz", x=table, y=np.arange(7))
    items, labels = readers.read(tmp_path / "t.npz")
    np.testing.assert_array_equal(items, table)
    np.testing.assert_array_equal(labels, np.arange(7))
    rgb = g.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)  # HWC images
    (tmp_path / "imgs").mkdir()
    for i, img in enumerate(rgb):
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i}.png")
    items, _ = readers.read(tmp_path / "imgs")
    np.testing.assert_array_equal(items, rgb.transpose(0, 3, 1, 2))
    items, _ = readers.read(tmp_path / "imgs", resize=(4, 4))
    assert items.shape == (3, 3, 4, 4)


def test_bad_own_data_isone_line_error(tmp_path, own_models):
    from PIL import Image

    (tmp_path / "text.csv").write_text("a,b\n1,x\n")
    one_line_error(runner.invoke(app, ["train", "--data", str(tmp_path / "text.csv"), "--out", str(tmp_path / "o")]),
              "column 'b' is not numeric")
    (tmp_path / "header.csv").write_text("a,b\n")
    one_line_error(runner.invoke(app, ["train", "--data", str(tmp_path / "header.csv"), "--out", str(tmp_path / "o")]),
              "no data rows")
    (tmp_path / "ragged").mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "ragged" / "a.png")
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "ragged" / "b.png")
    one_line_error(runner.invoke(app, ["train", "--data", str(tmp_path / "ragged"), "--out", str(tmp_path / "o")]),
              "--resize")
    nan = np.ones((50, 4), np.float32)
    nan[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    one_line_error(runner.invoke(app, ["train", "--data", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o")]),
              "NaN")
    np.save(tmp_path / "wide.npy", np.full((50, 4), 3.0, np.float32))
    one_line_error(runner.invoke(app, ["train", "--data", str(tmp_path / "wide.npy"), "--likelihood",
                                  "continuous-bernoulli", "--out", str(tmp_path / "o")]), "[0, 1]")
    assert not (tmp_path / "o").exists()
    folder, _ = own_models["gaussian"]
    np.save(tmp_path / "wrong.npy", np.zeros((3, 11), np.float32))
    one_line_error(runner.invoke(app, ["score", str(folder), "-i", str(tmp_path / "wrong.npy"), "-o",
                                  str(tmp_path / "s.npy")]), "(12,)")
    with pytest.raises(DataError, match="shape"):
        Engine.load(folder, backend="torch").encode(np.zeros((2, 3, 4)))


def test_old_model_folders_load_unchanged():
    old_mlp = {"arch": "mlp", "latent_dim": 4, "hidden": [8], "activation": "relu", "input_dim": 784}
    cfg = from_dict(ModelConfig, old_mlp)
    assert cfg.input_shape == (784,) and cfg.likelihood == "bernoulli" and not cfg.standardize
    assert from_dict(ModelConfig, {**old_mlp, "arch": "conv"}).input_shape == (1, 28, 28)
    with pytest.raises(VaeEngineError, match="conv architecture needs"):
        ModelConfig(arch="conv", input_shape=(20,))


def test_evaluate_on_other_data(own_models, tmp_path):
    folder, data_path = own_models["gaussian"]
    result = runner.invoke(app, ["evaluate", str(folder), "--data", str(data_path), "--k", "4", "--json",
                                 str(tmp_path / "ev.json")])
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n"] == 160 and ev["data"] == str(data_path)
    np.save(tmp_path / "wrong.npy", np.zeros((4, 5), np.float32))
    one_line_error(runner.invoke(app, ["evaluate", str(folder), "--data", str(tmp_path / "wrong.npy")]), "do not fit")
