"""The trainer: the loss goes down, runs are deterministic, resume is exact, checkpoints are safe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vae_engine import modeldir
from vae_engine.core.config import ModelConfig, TrainConfig
from vae_engine.core.errors import ModelDirError, VaeEngineError
from vae_engine.model.estimators import evaluate, reference_scores
from vae_engine.training.train import train

MODEL = ModelConfig(latent_dim=4, hidden=(32,))


def _cfg(tiny_data, **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "dir", "data_dir": str(tiny_data), "batch_size": 32, "seed": 3, **kw})


def test_training_lowers_the_loss(tiny_data, tmp_path):
    rows = train(MODEL, _cfg(tiny_data, epochs=4), tmp_path / "m", plots=False)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 20
    assert rows[-1]["test_nelbo"] < rows[0]["test_nelbo"]
    assert [r["epoch"] for r in modeldir.read_metrics(tmp_path / "m")] == [1, 2, 3, 4]


VAMP = ModelConfig(latent_dim=4, hidden=(32,), prior="vamp", pseudo_inputs=8)


@pytest.mark.parametrize("objective, k, model, precision", [("elbo", 1, MODEL, "fp32"), ("iwae", 3, MODEL, "fp32"),
                                                            ("dreg", 3, VAMP, "bf16"), ("elbo", 2, VAMP, "fp32")])
def test_resume_gives_identical_weights(tiny_data, tmp_path, objective, k, model, precision):
    cfg = _cfg(tiny_data, epochs=3, objective=objective, k=k, lr_schedule="cosine", kl_warmup_epochs=2,
               precision=precision)
    train(model, cfg, tmp_path / "straight", plots=False)
    train(model, TrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "resumed", plots=False)
    train(None, cfg, tmp_path / "resumed", resume=True, plots=False)
    for name in (modeldir.WEIGHTS, *((modeldir.PRIOR,) if model.prior == "vamp" else ())):
        a = load_file(str(tmp_path / "straight" / name))
        b = load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert modeldir.train_config(tmp_path / "resumed").precision == precision
    assert modeldir.read_metrics(tmp_path / "resumed")[-1]["epoch"] == 3


def test_same_seed_same_weights(tiny_data, tmp_path):
    for name in ("a", "b"):
        train(MODEL, _cfg(tiny_data, epochs=1), tmp_path / name, plots=False)
    assert (tmp_path / "a" / modeldir.WEIGHTS).read_bytes() == (tmp_path / "b" / modeldir.WEIGHTS).read_bytes()


def test_feed_workers_make_the_same_batches_in_order(monkeypatch):
    """The GPU's feed (worker threads, steps ahead) yields exactly the in-line batches, in the step order; its
    threads share the machine's cores with the other training processes on it."""
    from vae_engine.core import rng
    from vae_engine.training import feed
    from vae_engine.training.feed import Feed

    monkeypatch.setattr(feed, "available_cpus", lambda: 16)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert (feed.default_workers(cpu), feed.default_workers(gpu), feed.default_workers(gpu, processes=8)) == (0, 8, 1)

    x = torch.from_numpy(np.random.default_rng(0).random((300, 20), dtype=np.float32))
    order = torch.from_numpy(rng.permutation(7, len(x)))
    firsts = [0, 64, 128, 192, 32]
    with Feed(x, 32, 3, 4, True, torch.device("cpu"), workers=0) as inline, \
            Feed(x, 32, 3, 4, True, torch.device("cpu"), workers=3) as threaded:
        a, b = list(inline.batches(7, order, firsts)), list(threaded.batches(7, order, iter(firsts)))
    assert len(a) == len(b) == len(firsts)
    for (xa, ea), (xb, eb), first in zip(a, b, firsts, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ea, eb)
        assert torch.equal(xa, torch.from_numpy(rng.binarize_numpy(x[order[first:first + 32]].numpy(), 7, first)))
        assert torch.equal(ea, torch.from_numpy(rng.normal_eps(7, first, 32, 3, 4)))


def test_model_directory_layout(tiny_model):
    cfg = json.loads((tiny_model / modeldir.CONFIG).read_text())
    assert cfg["model"]["latent_dim"] == 4 and cfg["train"]["epochs"] == 2
    assert cfg["data"]["train"] == 256 and "torch" in cfg["versions"]
    model = modeldir.load_model(tiny_model)
    assert model.cfg == MODEL
    state = load_file(str(tiny_model / modeldir.STATE))
    assert any(k.startswith("optim.") for k in state)


def test_refuses_to_overwrite_and_bad_options(tiny_data, tiny_model, tmp_path):
    with pytest.raises(VaeEngineError, match="already holds a model"):
        train(MODEL, _cfg(tiny_data), tiny_model, plots=False)
    with pytest.raises(VaeEngineError, match="larger than the training set"):
        train(MODEL, _cfg(tiny_data, batch_size=10_000), tmp_path / "x", plots=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(VaeEngineError, match="epochs"):
        TrainConfig(epochs=0)


def test_corrupt_and_missing_weights(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / modeldir.WEIGHTS).write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ModelDirError, match="corrupt safetensors"):
        modeldir.load_model(broken)
    (broken / modeldir.WEIGHTS).unlink()
    with pytest.raises(ModelDirError, match="missing"):
        modeldir.load_model(broken)
    with pytest.raises(ModelDirError, match="not found"):
        modeldir.load_model(tmp_path / "nothing")


def test_reference_evaluation_is_chunk_independent(tiny_model, tiny_data):
    from vae_engine.data import load_split

    model = modeldir.load_model(tiny_model)
    images, _ = load_split(tiny_data, "test")
    score = lambda x, start, k, seed: reference_scores(model, x, start, k, seed)  # noqa: E731
    a = evaluate(score, images, k=8, seed=0, chunk=64)
    b = evaluate(score, images, k=8, seed=0, chunk=7)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    assert np.mean(a[1]) < np.mean(a[0])  # on average the k=8 IWAE estimate is tighter than the ELBO


def test_metrics_test_elbo_is_evaluates_estimate(tiny_model):
    """One estimator of the test -ELBO: the per-epoch metric equals `evaluate` at its default seed."""
    from vae_engine.jobs.evaluate import evaluate_model as run

    result = run(tiny_model, k=2, seed=0, backend="torch", threads=1)
    assert modeldir.read_metrics(tiny_model)[-1]["test_nelbo"] == pytest.approx(result["test_nelbo"], abs=1e-3)


def test_auto_likelihood_fits_the_data(tiny_data, tmp_path):
    """auto: IDX images -> bernoulli (binarized, the MNIST convention); other data in [0, 1] (uint8 or float,
    flat or image-shaped) -> continuous-bernoulli; anything else -> gaussian; config.json records why."""
    from vae_engine import data
    from vae_engine.training.train import auto_likelihood

    g = np.random.default_rng(0)
    idx = data.load_dataset("mnist", tiny_data)
    cases = {
        "idx": (idx, "bernoulli", "IDX"),
        "uint8 file": (data.Dataset("file", "f", idx.train_images, None, idx.test_images, None),
                       "continuous-bernoulli", "uint8"),
        "flat floats in [0, 1]": (data.Dataset("file", "f", g.random((20, 7), np.float32), None,
                                               g.random((5, 7), np.float32), None), "continuous-bernoulli", "[0, 1]"),
        "images in [0, 1]": (data.Dataset("file", "f", g.random((20, 1, 4, 4), np.float32), None,
                                          g.random((5, 1, 4, 4), np.float32), None), "continuous-bernoulli", "[0, 1]"),
        "a table": (data.Dataset("file", "f", g.normal(size=(20, 7)).astype(np.float32), None,
                                 g.random((5, 7), np.float32), None), "gaussian", "outside [0, 1]"),
        "just above 1": (data.Dataset("file", "f", np.full((20, 3), 1.001, np.float32), None,
                                      np.ones((5, 3), np.float32), None), "gaussian", "outside [0, 1]"),
    }
    for name, (ds, want, why) in cases.items():
        got, reason = auto_likelihood(ds)
        assert (got, why in reason) == (want, True), (name, got, reason)

    np.save(tmp_path / "x.npy", g.random((64, 10), np.float32))
    out = tmp_path / "m"
    train(ModelConfig(latent_dim=2, hidden=(8,), likelihood="auto"),
          TrainConfig(data=str(tmp_path / "x.npy"), epochs=1, batch_size=16),
          out, plots=False)
    doc = modeldir.read_config(out)
    assert doc["model"]["likelihood"] == "continuous-bernoulli"
    assert doc["data"]["likelihood_auto"].startswith("continuous-bernoulli: every value lies in [0, 1]")
