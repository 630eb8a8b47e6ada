"""VAEOutlierDetector: scikit-learn's outlier-detector contract, determinism, thresholds, persistence, each scoring
rule against a direct computation, and a small one-class case; the `detect` CLI and `train --contamination`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from vae_engine import modeldir
from vae_engine.anomaly.detector import RULES, VAEOutlierDetector
from vae_engine.anomaly.rules import StoredDetector, complexity_nats
from vae_engine.cli import app
from vae_engine.core.errors import ModelDirError
from vae_engine.model import kernels

from .conftest import one_line_error

runner = CliRunner()


def _blobs(n=300, d=8, seed=0, shift=0.0):
    """Normal items: a correlated Gaussian in d dims; anomalies: the same, shifted."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((d, d)) / np.sqrt(d)
    return (g.standard_normal((n, d)) @ a + shift).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    return VAEOutlierDetector(epochs=15, random_state=0, threads=2).fit(_blobs())


def test_one_class_auc_is_clearly_above_chance(fitted):
    normal, odd = _blobs(200, seed=1), _blobs(200, seed=1, shift=2.5)
    labels = np.r_[np.zeros(200), np.ones(200)]
    for rule in RULES:
        fitted.set_params(rule=rule)
        auc = roc_auc_score(labels, -fitted.score_samples(np.concatenate([normal, odd])))
        assert auc > 0.7, (rule, auc)  # chance is 0.5; the latent rule sees the shift only through the encoder
    fitted.set_params(rule="nll")


@pytest.mark.parametrize("rule", RULES)
def test_scores_are_deterministic_across_calls_batches_and_order(fitted, rule):
    fitted.set_params(rule=rule)
    x = _blobs(300, seed=2)
    s = fitted.score_samples(x)
    assert s.dtype == np.float64 and s.shape == (300,) and np.isfinite(s).all()
    assert np.array_equal(s, fitted.score_samples(x))  # bit-identical on a second call
    assert np.array_equal(s[:7], fitted.score_samples(x[:7]))  # another batch size
    perm = np.random.default_rng(0).permutation(300)
    assert np.array_equal(s[perm], fitted.score_samples(x[perm]))  # another position in the batch
    torch.set_num_threads(1)
    fitted._engine = None
    from vae_engine.runtime.backends import set_threads

    set_threads(1)
    try:
        assert np.array_equal(s, fitted.score_samples(x))  # another thread count
    finally:
        set_threads(2)
        fitted.set_params(rule="nll")


def test_threshold_flags_the_stated_fraction():
    x = _blobs()
    det = VAEOutlierDetector(epochs=5, contamination=0.1, random_state=0, threads=2).fit(x)
    assert abs((det.predict(x) == -1).mean() - 0.1) <= 0.01
    np.testing.assert_array_equal(det.decision_function(x), det.score_samples(x) - det.offset_)
    assert set(np.unique(det.fit_predict(x))) <= {-1, 1}


def test_rules_against_direct_computation(fitted):
    x = _blobs(20, seed=3)
    eng = fitted.engine
    mu, _ = eng.encode(x)
    fitted.set_params(rule="reconstruction")
    direct = kernels.log_prob_rows(x, eng.decode(mu, params=True), eng.likelihood)
    np.testing.assert_allclose(fitted.score_samples(x), direct, rtol=1e-5)
    fitted.set_params(rule="latent")
    from scipy.stats import multivariate_normal

    ref = multivariate_normal(fitted.latent_mean_, fitted.latent_cov_).logpdf(mu.astype(np.float64))
    np.testing.assert_allclose(fitted.score_samples(x), ref, rtol=1e-6)
    fitted.set_params(rule="nll")
    nll = fitted.score_samples(x)
    # the PyTorch reference with the same (shared) eps for every item
    from vae_engine.core import rng
    from vae_engine.model.estimators import iwae_bound, log_weights

    vae = modeldir.load_model(fitted.model_dir_)
    eps = np.broadcast_to(rng.normal_eps(fitted.seed_, 0, 1, fitted.k, vae.cfg.latent_dim), (20, fitted.k, 2))
    with torch.no_grad():
        ref = iwae_bound(log_weights(vae, torch.from_numpy(x), torch.from_numpy(eps.copy())))
    np.testing.assert_allclose(nll, ref.double().numpy(), rtol=1e-4)
    fitted.set_params(rule="nll-complexity")
    np.testing.assert_allclose(fitted.score_samples(x), nll + complexity_nats(x, fitted.quantize_range_), rtol=1e-9)
    fitted.set_params(rule="nll")


def test_save_load_round_trip(fitted, tmp_path):
    x = _blobs(50, seed=4)
    for rule in RULES:
        fitted.set_params(rule=rule)
        path = fitted.save(tmp_path / rule)
        loaded = VAEOutlierDetector.load(path)
        assert np.array_equal(loaded.score_samples(x), fitted.score_samples(x)) and loaded.offset_ == fitted.offset_
        stored = StoredDetector.load(path)  # what `detect` and the server apply, without scikit-learn
        assert np.array_equal(stored.score_samples(x), fitted.score_samples(x)) and stored.offset == fitted.offset_
        assert not list(path.glob("*.pkl")) and (path / "detector.json").is_file()
    fitted.set_params(rule="nll")
    (tmp_path / "latent" / "detector.json").write_text('{"schema": "vae-engine-detector/1", "rule": "nll"}')
    with pytest.raises(ModelDirError, match="malformed"):
        VAEOutlierDetector.load(tmp_path / "latent")


def test_bad_input_gets_sklearn_exceptions(fitted):
    with pytest.raises(NotFittedError):
        VAEOutlierDetector().predict(_blobs(5))
    with pytest.raises(ValueError, match="features"):
        fitted.predict(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError):
        fitted.score_samples(np.full((3, 8), np.nan, np.float32))
    with pytest.raises(ValueError):
        fitted.score_samples(np.zeros((0, 8), np.float32))
    for bad in (0.0, 0.6, -1, "most"):
        with pytest.raises(ValueError, match="contamination"):
            VAEOutlierDetector(contamination=bad).fit(_blobs(30))
    with pytest.raises(ValueError, match="rule"):
        VAEOutlierDetector(rule="vibes").fit(_blobs(30))


@pytest.mark.slow
def test_scikit_learn_estimator_checks():
    """Every check of scikit-learn's own suite (tiny epochs: the checks fit dozens of times)."""
    from sklearn.utils.estimator_checks import check_estimator

    failed = check_estimator(VAEOutlierDetector(epochs=2, random_state=0, threads=1), on_fail=None)
    bad = [(r["check_name"], str(r["exception"])[:200]) for r in failed if r["status"] == "failed"]
    assert not bad, bad


def test_cli_detect_and_train_contamination(tmp_path):
    x = _blobs(400)
    np.save(tmp_path / "x.npy", x)
    model = tmp_path / "m"
    r = runner.invoke(app, ["train", "--out", str(model), "--data", str(tmp_path / "x.npy"), "--epochs", "3",
                            "--no-plots", "--threads", "2", "--contamination", "0.05", "--hidden", "32,32",
                            "--latent-dim", "2"])
    assert r.exit_code == 0, r.output
    assert "detector: rule reconstruction" in r.output  # the default rule
    test = np.concatenate([_blobs(100, seed=5), _blobs(100, seed=5, shift=3.0)])
    labels = np.r_[np.zeros(100), np.ones(100)].astype(np.int8)
    np.save(tmp_path / "t.npy", test)
    np.save(tmp_path / "y.npy", labels)
    flags, scores, plot = tmp_path / "f.npy", tmp_path / "s.npy", tmp_path / "h.png"
    r = runner.invoke(app, ["detect", str(model), "-i", str(tmp_path / "t.npy"), "-o", str(flags), "--scores",
                            str(scores), "--labels", str(tmp_path / "y.npy"), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    f, s = np.load(flags), np.load(scores)
    det = VAEOutlierDetector.load(model)
    np.testing.assert_array_equal(s, det.score_samples(test))
    np.testing.assert_array_equal(f, det.predict(test))
    assert "ROC AUC" in r.output and plot.stat().st_size > 1000
    for rule in ("reconstruction", "latent", "nll-complexity"):
        r = runner.invoke(app, ["score", str(model), "-i", str(tmp_path / "t.npy"), "-o", str(tmp_path / "r.npy"),
                                "--rule", rule, "--k", "8", "--precision", "fp32", "--threads", "2"])
        assert r.exit_code == 0, r.output
        det.set_params(rule=rule, k=8)
        np.testing.assert_allclose(np.load(tmp_path / "r.npy"), -det.score_samples(test), rtol=1e-4)
    r = runner.invoke(app, ["detect", str(model), "-i", str(tmp_path / "t.npy"), "-o", str(flags),
                            "--contamination", "0.25"])
    assert r.exit_code == 0 and (np.load(flags) == -1).sum() == 50

    def one_line(args, fragment):
        one_line_error(runner.invoke(app, args), fragment)

    np.save(tmp_path / "bad.npy", np.zeros((4, 3), np.float32))
    one_line(["detect", str(model), "-i", str(tmp_path / "bad.npy"), "-o", str(flags)], "features")
    one_line(["detect", str(model), "-i", str(tmp_path / "t.npy"), "-o", str(flags), "--contamination", "0.9"],
             "contamination")
    one_line(["detect", str(tmp_path / "nowhere"), "-i", str(tmp_path / "t.npy"), "-o", str(flags)], "nowhere")
    plain = tmp_path / "plain"
    runner.invoke(app, ["train", "--out", str(plain), "--data", str(tmp_path / "x.npy"), "--epochs", "1",
                        "--no-plots", "--threads", "2"])
    one_line(["detect", str(plain), "-i", str(tmp_path / "t.npy"), "-o", str(flags)], "detector.json")
    one_line(["train", "--out", str(tmp_path / "m2"), "--data", str(tmp_path / "x.npy"), "--contamination", "0.7"],
             "contamination")


def test_fit_records_the_likelihood_auto_chose_and_why(tmp_path):
    g = np.random.default_rng(0)
    unit = VAEOutlierDetector(epochs=2, random_state=0).fit(g.random((80, 12)).astype(np.float32))
    assert unit.likelihood_ == "continuous-bernoulli" and "[0, 1]" in unit.likelihood_reason_
    table = VAEOutlierDetector(epochs=2, random_state=0).fit(g.normal(size=(80, 12)) * 50)
    assert table.likelihood_ == "gaussian" and "outside [0, 1]" in table.likelihood_reason_
    assert VAEOutlierDetector.load(unit.save(tmp_path / "d")).likelihood_ == "continuous-bernoulli"
