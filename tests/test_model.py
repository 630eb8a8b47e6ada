"""Loss terms against closed forms and direct formulas; shapes; numerical safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_engine.core import rng
from vae_engine.core.config import ModelConfig
from vae_engine.core.errors import VaeEngineError
from vae_engine.model import likelihoods
from vae_engine.model.estimators import elbo, iwae_bound, log_weights
from vae_engine.model.networks import VAE
from vae_engine.model.posterior import gaussian_kl, gaussian_log_prob, standard_normal_log_prob

BERNOULLI = likelihoods.get("bernoulli")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VAE(ModelConfig(latent_dim=3, hidden=(16,)))


def test_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected, rtol=1e-5, atol=1e-5)


def test_bernoulli_log_prob_matches_direct_formula():
    torch.manual_seed(2)
    logits = torch.randn(4, 784) * 3
    x = torch.bernoulli(torch.full((4, 784), 0.4))
    p = torch.sigmoid(logits).double()
    direct = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).sum(-1)
    torch.testing.assert_close(BERNOULLI.log_prob(x, logits).double(), direct, rtol=1e-5, atol=1e-3)


def test_gaussian_log_probs_match_torch_distributions():
    torch.manual_seed(3)
    z, mu, logvar = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6, 3)
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(z, mu, logvar), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(standard_normal_log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_iwae_k1_equals_single_sample_elbo(model):
    """With K=1 the IWAE bound is the single-sample ELBO estimate log p(x|z) + log p(z) - log q(z|x)."""
    torch.manual_seed(4)
    x = torch.bernoulli(torch.rand(8, 784))
    eps = torch.randn(8, 1, 3)  # (B, K, L)
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, eps)[:, 0]
    direct = (BERNOULLI.log_prob(x, model.decode(z)) + standard_normal_log_prob(z)
              - gaussian_log_prob(z, mu, logvar))
    torch.testing.assert_close(iwae_bound(log_weights(model, x, eps)), direct)
    # and it differs from the analytic-KL ELBO only by the KL estimate: KL(q||p) vs log q - log p at that z
    kl_sample = gaussian_log_prob(z, mu, logvar) - standard_normal_log_prob(z)
    torch.testing.assert_close(elbo(model, x, eps) - iwae_bound(log_weights(model, x, eps)),
                               kl_sample - gaussian_kl(mu, logvar), rtol=1e-4, atol=1e-4)


def test_iwae_bound_is_tighter_and_uses_logsumexp(model):
    torch.manual_seed(5)
    x = torch.bernoulli(torch.rand(4, 784))
    eps = torch.randn(4, 64, 3)
    log_w = log_weights(model, x, eps)
    assert log_w.shape == (4, 64)
    assert torch.all(iwae_bound(log_w) >= log_w.mean(-1))  # Jensen: L_K >= L_1 estimate averaged
    big = torch.tensor([[1000.0, 1000.0]])  # naive exp would overflow
    torch.testing.assert_close(iwae_bound(big), torch.tensor([1000.0]))


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
def test_shapes_and_no_nan_for_extreme_inputs(arch):
    torch.manual_seed(6)
    m = VAE(ModelConfig(arch=arch, latent_dim=5, hidden=(16,)))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(50)  # huge weights push logvar and logits to extremes
    x = torch.cat([torch.zeros(1, 784), torch.ones(1, 784), torch.rand(2, 784)])
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (4, 5)
    logits = m.decode(mu)
    assert logits.shape == (4, 784)
    for value in (elbo(m, x, torch.randn(4, 2, 5)), iwae_bound(log_weights(m, x, torch.randn(4, 3, 5)))):
        assert torch.isfinite(value).all()


def test_config_rejects_nonsense():
    with pytest.raises(VaeEngineError, match="latent dim"):
        ModelConfig(latent_dim=0)
    with pytest.raises(VaeEngineError, match="architecture"):
        ModelConfig(arch="transformer")


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_likelihood_samples_follow_the_distribution(name):
    """x ~ p(x|params) for every likelihood: keyed by (seed, item index) alone, and distributed as the
    likelihood says: the mean of many draws is its E[x] (`mean`), and for the Gaussian its variance exp(logvar)."""
    lk = likelihoods.get(name)
    g = np.random.default_rng(0)
    one = g.standard_normal((1, 6 * lk.n_params)).astype(np.float32) * 2  # logits, or [mean | logvar]
    params = np.repeat(one, 40000, axis=0)  # one item's parameters, drawn for 40,000 item indices
    x = lk.sample(params, seed=3, start=0)
    assert x.shape == (40000, 6) and x.dtype == np.float32
    np.testing.assert_array_equal(lk.sample(params[:50], seed=3, start=100), x[100:150])  # any chunking
    assert not np.array_equal(lk.sample(params[:50], seed=4, start=100), x[100:150])
    sd = x.std(0) / np.sqrt(len(x))
    np.testing.assert_array_less(np.abs(x.mean(0) - lk.mean(one)[0]), 5 * sd + 1e-6)
    if name == "gaussian":
        np.testing.assert_allclose(x.var(0), np.exp(one[0, 6:]), rtol=0.05)
    else:
        assert x.min() >= 0 and x.max() <= 1
    if name == "bernoulli":  # pixels are u < p with the item's binarization uniforms
        np.testing.assert_array_equal(x, rng.binarize_numpy(lk.mean(params), 3, 0))


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_likelihood_mean_in_onnx_matches_its_numpy_twin(name):
    """`mean_onnx`, run by ONNX Runtime on seeded parameters and on extreme logits (down to -90, where ONNX
    Runtime's own Sigmoid loses all relative precision), is `mean` to float32 rounding; the continuous Bernoulli
    has none (its float32 form cancels near l = 0), so graphs leave its mean to NumPy."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    lk = likelihoods.get(name)
    d = 7
    nodes = lk.mean_onnx("params", "mean", d)
    if name == "continuous-bernoulli":
        assert nodes is None
        return
    nodes = [onnx.NodeProto.FromString(n) for n in nodes]  # encoded without onnx (core.onnxwire)
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(nodes, "mean", [helper.make_tensor_value_info("params", f, ["b", lk.n_params * d])],
                              [helper.make_tensor_value_info("mean", f, ["b", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    params = (g.standard_normal((64, lk.n_params * d)) * 8).astype(np.float32)
    params[0, :d] = [-90, -40, -17, -10, 0, 17, 40]
    got, want = session.run(None, {"params": params})[0], lk.mean(params)
    assert got.shape == want.shape == (64, d) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-37)


def test_posterior_object_against_torch_distributions():
    """DiagonalGaussian (mean, sample, log_prob, kl) against torch.distributions on seeded values, in the one eps
    layout (B, K, L); a sample-major (K, B, L) tensor is refused instead of broadcast into (B, B, L)."""
    from vae_engine.model.posterior import DiagonalGaussian

    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q, ref = DiagonalGaussian(mu, logvar), torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    eps = torch.randn(5, 7, 3, generator=g)
    z = q.sample(eps)
    torch.testing.assert_close(z, mu[:, None] + ref.stddev[:, None] * eps)
    torch.testing.assert_close(q.log_prob(z), torch.distributions.Normal(mu[:, None], ref.stddev[:, None])
                               .log_prob(z).sum(-1))
    torch.testing.assert_close(q.kl(), torch.distributions.kl_divergence(ref, torch.distributions.Normal(0.0, 1.0))
                               .sum(-1))
    assert q.mean is mu and not q.detach().mu.requires_grad
    with pytest.raises(ValueError, match=r"\(B, K, L\)"):
        q.sample(torch.randn(7, 5, 3))
