"""The VampPrior, DReG gradients and bf16 training, each against an independent computation on seeded data."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vae_engine import modeldir
from vae_engine.core import hardware
from vae_engine.core.config import ModelConfig, TrainConfig
from vae_engine.core.errors import ModelDirError, VaeEngineError
from vae_engine.model import kernels, priors
from vae_engine.model.estimators import (
    dreg_bound,
    iwae_bound,
    log_weights,
    log_weights_and_z,
    reference_nelbo,
    reference_scores,
)
from vae_engine.model.networks import VAE
from vae_engine.model.posterior import gaussian_log_prob, standard_normal_log_prob
from vae_engine.runtime.engine import Engine
from vae_engine.training.train import GPU_FP32_WHY, Objective, auto_precision, step_flops, train

VAMP = ModelConfig(latent_dim=5, hidden=(24,), prior="vamp", pseudo_inputs=7)


def _mixture(mu: torch.Tensor, logvar: torch.Tensor) -> torch.distributions.Distribution:
    """The same prior from torch.distributions: equal weights over diagonal Gaussians."""
    d = torch.distributions
    return d.MixtureSameFamily(d.Categorical(logits=torch.zeros(len(mu), dtype=mu.dtype)),
                               d.Independent(d.Normal(mu, torch.exp(0.5 * logvar)), 1))


def _vamp_model(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    model = VAE(VAMP)
    model.init_pseudo_inputs(torch.rand(40, 784), torch.Generator().manual_seed(seed))
    return model


def test_vamp_log_prob_matches_mixture_same_family():
    model = _vamp_model()
    z = torch.randn(3, 6, 5) * 2.0
    with torch.no_grad():
        mu, logvar = model.prior.components()
        want = _mixture(mu.double(), logvar.double()).log_prob(z.double())
        # float32 with the expanded quadratic form: ~1e-6 relative on log-densities of order 10
        torch.testing.assert_close(model.prior.log_prob(z).double(), want, rtol=1e-5, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the density stays fp32 under autocast
            got = priors.mixture_log_prob(z, mu, logvar)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_vamp_prior_parameters_are_the_pseudo_inputs_only():
    model = _vamp_model()
    assert [k for k in model.state_dict() if k.startswith("prior.")] == ["prior.pseudo_inputs"]
    assert model.prior.pseudo_inputs.shape == (7, 784)
    assert VAE(ModelConfig(latent_dim=5, hidden=(24,))).state_dict().keys().isdisjoint({"prior.pseudo_inputs"})


def test_engine_mixture_kernel_matches_its_twins():
    g = np.random.default_rng(0)
    mu, logvar = g.normal(size=(30, 6)).astype(np.float32), g.uniform(-4, 1, (30, 6)).astype(np.float32)
    prior = priors.MixturePrior(mu, logvar)
    for n in (1, 50, 9000):  # 9000 x 30 x 6 crosses PARALLEL_MIN: the parallel variant too
        z = g.normal(size=(n, 6)).astype(np.float32) * 3
        want = _mixture(torch.from_numpy(mu).double(), torch.from_numpy(logvar).double()).log_prob(
            torch.from_numpy(z).double()).numpy()
        np.testing.assert_allclose(prior.log_prob_numpy(z), want, rtol=1e-10, atol=1e-9)
        # float32 sums and the polynomial exp (6.5e-6 relative) inside the log-sum-exp
        np.testing.assert_allclose(prior.log_prob(z), want, rtol=2e-6, atol=2e-5)


def test_log_weights_kernel_with_a_prior_density():
    g = np.random.default_rng(1)
    b, k, d, p = 4, 3, 5, 784
    x = (g.random((b, p)) < 0.3).astype(np.float32)
    logits = g.normal(size=(b, k, p)).astype(np.float32)
    mu, logvar = g.normal(size=(b, d)).astype(np.float32), g.uniform(-2, 1, (b, d)).astype(np.float32)
    z = kernels.reparameterize(mu, logvar, g.normal(size=(b, k, d)).astype(np.float32))
    log_pz = g.normal(size=(b, k)).astype(np.float32) - 8.0
    want = kernels.log_weights_numpy(x, logits, z, mu, logvar, log_pz=log_pz)
    np.testing.assert_allclose(kernels.log_weights(x, logits, z, mu, logvar, log_pz=log_pz), want, rtol=1e-5,
                               atol=2e-3)
    # with log p(z) = log N(z; 0, I) passed in, the result equals the fused standard-normal kernel
    std = (-0.5 * np.sum(math.log(2 * math.pi) + z.astype(np.float64) ** 2, -1)).astype(np.float32)
    np.testing.assert_allclose(kernels.log_weights(x, logits, z, mu, logvar, log_pz=std),
                               kernels.log_weights(x, logits, z, mu, logvar), rtol=1e-5, atol=2e-3)
    with pytest.raises(ValueError, match="log_pz"):
        kernels.log_weights(x, logits, z, mu, logvar, log_pz=log_pz[:, :2])


def _dreg_reference(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """DReG's gradient of the IWAE bound (Tucker et al. 2018, eq. 5), written out the long way in two passes:
    the encoder's through z alone, sum_k w~_k^2 d log w_k / d phi with q's parameters held fixed in log q; the rest
    (decoder, pseudo-inputs, and the encoder as the prior's network) from sum_k w~_k log w_k with z held fixed."""
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    mu, logvar = model.encode(x)
    mu, logvar = mu[:, None], logvar[:, None]  # (B, 1, L) against eps (B, K, L)
    z = mu + torch.exp(0.5 * logvar) * eps
    z_fixed = z.detach()
    log_q = gaussian_log_prob

    # pass 1: the encoder through the samples only (the prior's components held fixed, so p enters only via z)
    if model.cfg.prior == "vamp":
        with torch.no_grad():
            c_mu, c_logvar = model.prior.components()
        log_p = priors.mixture_log_prob(z, c_mu, c_logvar)
    else:
        log_p = standard_normal_log_prob(z)
    log_w1 = model.likelihood.log_prob(x[:, None], model.decode(z)) + log_p - log_q(z, mu.detach(), logvar.detach())
    w = torch.softmax(log_w1.detach(), -1)
    g_path = torch.autograd.grad((w**2 * log_w1).sum(), enc)
    # pass 2: at fixed z, the decoder and the prior (pseudo-inputs and the encoder that maps them)
    log_w2 = (model.likelihood.log_prob(x[:, None], model.decode(z_fixed)) + model.prior.log_prob(z_fixed)
              - log_q(z_fixed, mu.detach(), logvar.detach()))
    g_enc_prior = torch.autograd.grad((w * log_w2).sum(), enc, retain_graph=True, allow_unused=True,
                                      materialize_grads=True)
    g_rest = torch.autograd.grad((w * log_w2).sum(), rest)
    grads = {n: a + b for n, a, b in zip([n for n, _ in model.named_parameters() if n.startswith("encoder.")],
                                          g_path, g_enc_prior, strict=True)}
    grads.update(zip([n for n, _ in model.named_parameters() if not n.startswith("encoder.")], g_rest, strict=True))
    return grads


@pytest.mark.parametrize("prior", ["normal", "vamp"])
def test_dreg_gradient_matches_the_two_pass_formula(prior):
    model = _vamp_model(2) if prior == "vamp" else VAE(ModelConfig(latent_dim=5, hidden=(24,)))
    torch.manual_seed(3)
    x = (torch.rand(6, 784) < 0.3).float()
    eps = torch.randn(6, 4, 5)  # (B, K, L)
    model.zero_grad()
    bound = dreg_bound(model, x, eps)
    bound.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(bound.detach(), iwae_bound(log_weights(model, x, eps)).detach())  # its value
    want = _dreg_reference(model, x, eps)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # the decoder gets IWAE's own gradient; the encoder a different (lower-variance) one
    model.zero_grad()
    iwae_bound(log_weights(model, x, eps)).sum().backward()
    iwae = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in got:
        if name.startswith("decoder."):
            # two float32 graphs: log-weights near -550 nats carry ~3e-5 of rounding into w~, so compare on the
            # gradient's own scale
            torch.testing.assert_close(got[name], iwae[name], rtol=1e-4, atol=1e-4 * float(iwae[name].abs().max()))
    assert not torch.allclose(got["encoder.net.0.weight"], iwae["encoder.net.0.weight"], atol=1e-4)


def test_dreg_matches_the_detached_log_weights():
    model = _vamp_model(4)
    x, eps = (torch.rand(3, 784) < 0.5).float(), torch.randn(3, 2, 5)
    log_w, z = log_weights_and_z(model, x, eps, detach_q=True)
    torch.testing.assert_close(log_w, log_weights(model, x, eps))  # detaching changes gradients, not values
    assert z.shape == (3, 2, 5) and log_w.shape == (3, 2)


def test_bf16_objective_keeps_fp32_maths():
    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim=5, hidden=(64,)))
    x, eps = (torch.rand(32, 784) < 0.3).float(), torch.randn(32, 3, 5)
    losses = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        loss = Objective(model, "iwae", precision)(x, eps, 1.0)
        loss.backward()
        assert loss.dtype == torch.float32
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        losses[precision] = loss.item()
    # bf16 rounds the GEMM inputs (8 bits of mantissa): a ~550-nat loss moves by well under 1%
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16


def test_auto_precision_follows_the_cpu():
    avx2 = hardware.Machine("AMD EPYC (AVX2)", frozenset({"avx2", "fma"}))
    bf16 = hardware.Machine("AMD EPYC (Zen 4)", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}))
    amx = hardware.Machine("Intel Xeon", frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}))
    for machine, want in ((avx2, "fp32"), (bf16, "bf16"), (amx, "bf16")):
        with hardware.pretend(machine):
            assert auto_precision()[0] == want
            assert auto_precision("cpu")[1] == f"this CPU has {'' if want == 'bf16' else 'no '}native bf16"


def test_auto_precision_on_a_gpu_follows_the_gpu_not_the_cpu():
    avx2 = frozenset({"avx2", "fma"})
    h100 = hardware.Machine("AMD EPYC (AVX2)", avx2, gpu="NVIDIA H100 80GB HBM3")
    t4 = hardware.Machine("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16"}), gpu="Tesla T4", gpu_bf16=False)
    with hardware.pretend(h100):
        assert auto_precision("cuda") == ("fp32", GPU_FP32_WHY)  # measured: launch-bound, bf16 slower
        assert auto_precision("cpu")[0] == "fp32"  # the same machine training on its CPU
    with hardware.pretend(t4):
        assert auto_precision("cuda") == ("fp32", "this GPU has no native bf16")
        assert auto_precision("cpu")[0] == "bf16"


def test_resolve_device_names_and_refusals():
    gpu = hardware.Machine("x", frozenset(), gpu="NVIDIA H100")
    with hardware.pretend(gpu):
        assert hardware.resolve_device("auto") == "cuda"
        assert hardware.resolve_device("CUDA:1") == "cuda:1"
        assert hardware.resolve_device("cpu") == "cpu"
    with hardware.pretend(hardware.Machine("x", frozenset())):
        assert hardware.resolve_device("auto") == "cpu"
        with pytest.raises(VaeEngineError, match="torch sees no CUDA GPU here"):
            hardware.resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "cuda:", "mps:0", ""):
        with pytest.raises(VaeEngineError, match="unknown device"):
            hardware.resolve_device(bad)


def test_train_device_cpu_is_the_default_run_and_recorded(tiny_data, tmp_path):
    cfg = TrainConfig(dataset="dir", data_dir=str(tiny_data), epochs=1, batch_size=64, precision="fp32", limit=256)
    for name, device in (("default", None), ("cpu", "cpu"), ("auto", "auto")):
        train(ModelConfig(latent_dim=4, hidden=(16,)), cfg, tmp_path / name, plots=False,
              **({"device": device} if device else {}))
    want = modeldir.read_metrics(tmp_path / "default")[0]
    assert want["device"] == "cpu"
    for name in ("cpu",) + (() if torch.cuda.is_available() else ("auto",)):
        row = modeldir.read_metrics(tmp_path / name)[0]
        assert (row["train_loss"], row["test_nelbo"]) == (want["train_loss"], want["test_nelbo"])


def test_step_flops_counts_the_prior_and_the_samples():
    normal, vamp = ModelConfig(latent_dim=5, hidden=(24,)), VAMP
    enc = 2 * (784 * 24 + 24 * 10)
    dec = 2 * (5 * 24 + 24 * 784)
    assert step_flops(normal, 100, 3) == pytest.approx(3 * (100 * enc + 300 * dec))
    assert step_flops(vamp, 100, 3) == pytest.approx(3 * (107 * enc + 300 * dec))


def test_config_checks():
    for bad, match in (({"prior": "laplace"}, "unknown prior"), ({"pseudo_inputs": 0}, "pseudo inputs"),
                       ({"prior": 3}, "prior must be a string")):
        with pytest.raises(VaeEngineError, match=match):
            ModelConfig(**bad)
    with pytest.raises(VaeEngineError, match="training precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(VaeEngineError, match="unknown objective"):
        TrainConfig(objective="vimco")
    assert ModelConfig().prior == "normal" and TrainConfig().precision == "fp32"  # what old folders mean


@pytest.fixture(scope="module")
def vamp_dir(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vamp") / "m"
    train(ModelConfig(latent_dim=4, hidden=(32,), prior="vamp", pseudo_inputs=6),
          TrainConfig(dataset="dir", data_dir=str(tiny_data), epochs=2, batch_size=32, seed=5, objective="dreg",
                      k=3, precision="bf16"), out, plots=False)
    return out


def test_vamp_model_folder_and_engine_equal_the_reference(vamp_dir):
    assert (vamp_dir / modeldir.PRIOR).is_file()
    model = modeldir.load_model(vamp_dir)
    with torch.no_grad():
        mu, logvar = model.prior.components()
    stored = modeldir.load_prior(vamp_dir, model.cfg)
    np.testing.assert_array_equal(stored.mu, mu.numpy())  # the folder's mixture is the model's
    engine = Engine.load(vamp_dir, backend="torch")
    x = (np.random.default_rng(0).random((20, 784)) < 0.2).astype(np.float32)
    nelbo, nll = reference_scores(model, x, 3, 64, 7)
    np.testing.assert_allclose(-engine.log_likelihood(x, k=64, seed=7, start=3), nll, rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(-engine.elbo(x, seed=7, start=3), reference_nelbo(model, x, 3, 7), rtol=1e-5,
                               atol=2e-3)
    assert nll.mean() < nelbo.mean()  # the 64-sample bound is tighter than the one-sample ELBO
    # the GPU's path (log-weights and the mixture's log-density next to the decoder), forced on the CPU here
    host = engine.log_likelihood(x, k=64, seed=7, start=3)
    engine.backend.score_rows = 100  # blocks that split k
    np.testing.assert_allclose(engine.log_likelihood(x, k=64, seed=7, start=3), host, rtol=1e-5, atol=1e-3)


def test_vamp_samples_come_from_the_mixture(vamp_dir):
    engine = Engine.load(vamp_dir, backend="torch")
    prior = engine.prior
    z = prior.sample(11, 0, 4000)
    assert z.shape == (4000, 4) and z.dtype == np.float32
    np.testing.assert_array_equal(prior.sample(11, 100, 5), z[100:105])  # per-item streams: any chunking
    # each sample is one component's mean plus its sigma times the item's eps
    eps = engine.sample_posterior(np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32), 1, 11, 0)[0, 0]
    first = (z[0] - prior.mu) / np.exp(0.5 * prior.logvar)  # (C, L): the eps each component would need
    assert np.min(np.abs(first - eps).max(1)) < 1e-5
    # the draws follow the mixture: their mean and variance match its moments
    mean = prior.mu.mean(0)
    var = (np.exp(prior.logvar) + prior.mu**2).mean(0) - mean**2
    np.testing.assert_allclose(z.mean(0), mean, atol=5 * np.sqrt(var.max() / 4000))
    np.testing.assert_allclose(z.var(0), var, rtol=0.15)
    assert engine.sample(3, seed=1).shape == (3, 784)


@pytest.mark.parametrize("which", ["vamp", "normal"])
def test_training_draws_the_samples_the_engine_draws(which, vamp_dir, tiny_model):
    """One family of random streams: the PyTorch prior's samples (the training figures' samples.png) are the
    engine's for the same seed and item indices (`vae-engine sample --seed`)."""
    folder = vamp_dir if which == "vamp" else tiny_model
    model = modeldir.load_model(folder)
    engine_prior = modeldir.load_prior(folder, model.cfg)
    with torch.no_grad():
        z = model.prior.sample(30, model.cfg.latent_dim, 5, 7).numpy()
    np.testing.assert_allclose(z, engine_prior.sample(5, 7, 30), rtol=1e-6, atol=1e-6)
    assert not np.allclose(z, engine_prior.sample(6, 7, 30))  # another seed, other draws


def test_vamp_export_runs_the_same_prior(vamp_dir, tmp_path):
    from vae_engine.export.exporter import export

    out = tmp_path / "exported"
    report = export(vamp_dir, out)
    assert (out / modeldir.PRIOR).read_bytes() == (vamp_dir / modeldir.PRIOR).read_bytes()
    engine = Engine.load(out, backend="onnxruntime")
    x = (np.random.default_rng(2).random((16, 784)) < 0.2).astype(np.float32)
    torch_engine = Engine.load(vamp_dir, backend="torch")
    np.testing.assert_allclose(engine.log_likelihood(x, k=32), torch_engine.log_likelihood(x, k=32), atol=1e-3)
    assert math.isfinite(report["test_nelbo_fp32"])


@pytest.mark.parametrize("damage, match", [
    ("missing", "missing"), ("shape", "config.json needs"), ("nan", "NaN or Inf"), ("logvar", "outside"),
    ("garbage", "corrupt safetensors"), ("extra", "unexpected")])
def test_bad_prior_files_are_refused(vamp_dir, tmp_path, damage, match):
    broken = tmp_path / "broken"
    shutil.copytree(vamp_dir, broken)
    path = broken / modeldir.PRIOR
    mu, logvar = torch.zeros(6, 4), torch.zeros(6, 4)
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00nonsense")
    else:
        tensors = {"shape": {"mu": torch.zeros(5, 4), "logvar": logvar},
                   "nan": {"mu": mu.clone().fill_(float("nan")), "logvar": logvar},
                   "logvar": {"mu": mu, "logvar": logvar - 100.0},
                   "extra": {"mu": mu, "logvar": logvar, "pickle": torch.zeros(1)}}[damage]
        save_file(tensors, str(path))
    with pytest.raises(ModelDirError, match=match):
        Engine.load(broken, backend="torch")


def test_nll_checks_land_in_the_metrics_and_the_plot(tiny_data, tmp_path):
    from vae_engine.training import train as train_mod

    out = tmp_path / "m"
    rows = train(ModelConfig(latent_dim=4, hidden=(32,)),
                 TrainConfig(dataset="dir", data_dir=str(tiny_data), epochs=3, batch_size=32, nll_every=2), out,
                 plots=True)
    assert ["test_nll_k1000" in r for r in rows] == [False, True, True]  # every 2nd epoch and the last
    model = modeldir.load_model(out)
    x = train_mod.data.to_unit(train_mod.data.load_test_data(modeldir.train_config(out))[0])
    assert rows[-1]["test_nll_k1000"] == pytest.approx(train_mod.test_nll(model, x, modeldir.train_config(out)))
    assert rows[-1]["test_nll_k1000"] < rows[-1]["test_nelbo"]  # k=1000 is a tighter bound than the ELBO
    assert all(r["precision"] == "fp32" and r["gflops"] > 0 for r in rows)
    import importlib.util

    spec = importlib.util.spec_from_file_location("nll_vs_time", Path(__file__).parents[1] / "bench" /
                                                  "nll_vs_time.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(out), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert script.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2


def test_auto_precision_is_resolved_and_recorded(tiny_data, tmp_path):
    avx2 = hardware.Machine("AMD EPYC (AVX2)", frozenset({"avx2", "fma"}))
    with hardware.pretend(avx2):
        train(ModelConfig(latent_dim=4, hidden=(32,)),
              TrainConfig(dataset="dir", data_dir=str(tiny_data), epochs=1, batch_size=64, precision="auto"),
              tmp_path / "m", plots=False)
    saved = modeldir.read_config(tmp_path / "m")
    assert saved["train"]["precision"] == "fp32"  # the resolved precision, so --resume trains on in it
    assert saved["data"]["precision_auto"] == "fp32: this CPU has no native bf16"
    assert modeldir.read_metrics(tmp_path / "m")[0]["precision"] == "fp32"
