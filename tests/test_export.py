"""ONNX export: parity with PyTorch, metadata, int8 accuracy, and refusal of bad graphs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from vae_engine import modeldir
from vae_engine.core.errors import ModelDirError
from vae_engine.export.exporter import FP32_ATOL, REPORT, export
from vae_engine.modeldir import graphs


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, out / name)
    report = export(out, optimize=True, quantize="int8")
    return out, report


@pytest.mark.parametrize("batch", [1, 37])
def test_onnx_matches_pytorch(exported, batch):
    out, _ = exported
    model = modeldir.load_model(out)
    cfg = model.cfg
    x = torch.rand(batch, 784, generator=torch.Generator().manual_seed(batch))
    z = torch.randn(batch, cfg.latent_dim, generator=torch.Generator().manual_seed(batch))
    enc = graphs.make_session(graphs.load_graph(graphs.graph_path(out, "encoder"), "encoder", cfg))
    dec = graphs.make_session(graphs.load_graph(graphs.graph_path(out, "decoder"), "decoder", cfg))
    mu, logvar = enc.run(None, {"x": x.numpy()})
    (logits,) = dec.run(None, {"z": z.numpy()})
    with torch.no_grad():
        ref_mu, ref_logvar = model.encode(x)
        ref_logits = model.decode(z)
    # fp32 on both sides; the same products summed in different orders differ by ~1e-6 relative
    np.testing.assert_allclose(mu, ref_mu.numpy(), atol=FP32_ATOL)
    np.testing.assert_allclose(logvar, ref_logvar.numpy(), atol=FP32_ATOL)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=FP32_ATOL)


def test_metadata_round_trip(exported):
    out, _ = exported
    cfg = modeldir.model_config(out)
    for role in graphs.ROLES:
        for variant in ("fp32", "optimized", "int8"):
            meta = graphs.load_graph(graphs.graph_path(out, role, variant), role, cfg).metadata
            assert meta["vae_engine.role"] == role and meta["vae_engine.variant"] == variant
            assert meta["vae_engine.weights_sha256"] == modeldir.weights_sha256(out)
            assert json.loads(meta["vae_engine.model_config"])["latent_dim"] == cfg.latent_dim
            assert [n for n, _ in json.loads(meta["vae_engine.inputs"])] == ["x" if role == "encoder" else "z"]
    g = onnx.load(graphs.graph_path(out, "decoder"))
    assert g.opset_import[0].version >= 18
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_int8_within_stated_tolerance(exported):
    out, report = exported
    assert json.loads((out / REPORT).read_text()) == report
    by_variant = {v["variant"]: v for v in report["variants"]}
    # the fp32 graphs' test -ELBO against the PyTorch module on the same binarized items and eps
    from vae_engine import data
    from vae_engine.core import rng
    from vae_engine.model.estimators import elbo

    vae = modeldir.load_model(out)
    items, _ = data.load_test_data(modeldir.train_config(out))
    x = rng.binarize(data.to_float(items), report["seed"], 0)
    eps = torch.from_numpy(rng.normal_eps(report["seed"], 0, len(x), 1, vae.cfg.latent_dim))  # (B, 1, L)
    with torch.no_grad():
        ref = -elbo(vae, torch.from_numpy(x), eps).double().mean().item()
    assert by_variant["fp32"]["test_nelbo"] == pytest.approx(ref, abs=1e-3)
    assert abs(by_variant["optimized"]["test_nelbo_change_nats"]) < 1e-3


def test_int8_keeps_the_fastest_candidate_within_budget(exported):
    """The report's choice follows its own rule, and the NLL change it reports for the written graphs is what
    tuning's measure finds when it runs them again (same items, same eps: deterministic)."""
    from vae_engine.runtime import tuning
    from vae_engine.runtime.engine import Engine

    out, report = exported
    rows = report["int8"]["candidates"]
    assert rows and sum(bool(r.get("chosen")) for r in rows) == 1
    chosen = next(r for r in rows if r.get("chosen"))
    for r in rows:
        bound = abs(r["nll_change_nats"]) + report["int8"]["confidence_se"] * r["nll_change_se_nats"]
        assert r["within_budget"] == (bound <= report["int8"]["budget_nats"])
        assert r["int8_layers"] and 0 < r["int8_macs_fraction"] <= 1
    fits = [r for r in rows if r["within_budget"]]
    if fits:
        assert chosen["items_per_s"] == max(r["items_per_s"] for r in fits) and not report.get("warnings")
    else:
        assert abs(chosen["nll_change_nats"]) == min(abs(r["nll_change_nats"]) for r in rows)
        assert "no int8 layer set" in report["warnings"][0]
    assert set(report["int8"]["layer_rounding"].values()) <= {"gptq", "nearest"}

    cfg = modeldir.model_config(out)
    counts = [graphs.graph_macs(graphs.load_graph(graphs.graph_path(out, role, "int8"), role, cfg))
              for role in graphs.ROLES]
    int8_macs, all_macs = sum(c["int8"] for c in counts), sum(c["int8"] + c["float"] for c in counts)
    assert int8_macs / all_macs == pytest.approx(chosen["int8_macs_fraction"], abs=1e-4) and int8_macs > 0
    threads = report["int8"]["threads"]
    ref = tuning.reference(Engine.load, out, threads)
    again = tuning.accuracy(Engine.load(out, backend="onnxruntime", precision="int8", threads=threads), ref)
    assert again["nll_change_nats"] == pytest.approx(chosen["nll_change_nats"], abs=1e-6)


def _copy(out, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(out, dst)
    return dst


def test_corrupt_and_truncated_onnx_rejected(exported, tmp_path):
    dst = _copy(exported[0], tmp_path)
    cfg = modeldir.model_config(dst)
    path = graphs.graph_path(dst, "decoder")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelDirError, match="corrupt or truncated"):
        graphs.load_graph(path, "decoder", cfg)
    path.write_bytes(b"not an onnx file at all")
    with pytest.raises(ModelDirError, match="corrupt or truncated"):
        graphs.load_graph(path, "decoder", cfg)


def test_wrong_input_shape_rejected(exported, tmp_path):
    dst = _copy(exported[0], tmp_path)
    path = graphs.graph_path(dst, "decoder")
    g = onnx.load(path)
    g.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 99
    onnx.save(g, path)
    with pytest.raises(ModelDirError, match=r"input 'z' has shape \['batch', 99\]|input 'z' has shape"):
        graphs.load_graph(path, "decoder", modeldir.model_config(dst))


def test_external_data_refused(exported, tmp_path):
    dst = _copy(exported[0], tmp_path)
    path = graphs.graph_path(dst, "decoder")
    g = onnx.load(path)
    tensor = g.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/weights.bin")  # a path-traversal attempt
    path.write_bytes(g.SerializeToString())
    with pytest.raises(ModelDirError, match="external data"):
        graphs.load_graph(path, "decoder", modeldir.model_config(dst))


def test_failed_validation_leaves_no_files(tiny_model, tmp_path, monkeypatch):
    import vae_engine.export.exporter as ex
    from vae_engine.export import tracing

    dst = tmp_path / "m"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, dst / name)

    def broken(model, feed, threads=None):
        return [o + 1.0 for o in graphs.make_session(model).run(None, {model.graph.input[0].name: feed})]

    monkeypatch.setattr(tracing, "run", broken)
    with pytest.raises(ex.ExportError, match="differs from PyTorch"):
        export(dst)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_weights(tmp_path, tiny_model):
    dst = tmp_path / "m"
    dst.mkdir()
    shutil.copy(tiny_model / "config.json", dst / "config.json")
    with pytest.raises(ModelDirError, match="missing"):
        export(dst)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
def test_work_counted_on_the_graphs_equals_the_networks_own(tmp_path):
    """`graph_macs` counts an exported model's multiply-adds without PyTorch (convolutions by ONNX shape
    inference): the same numbers as the forward hooks on the networks, for each architecture."""
    from vae_engine.core.config import ModelConfig
    from vae_engine.model.networks import VAE
    from vae_engine.perf.work import model_flops

    for arch in ("mlp", "conv", "resnet"):
        cfg = ModelConfig(arch=arch, latent_dim=8, hidden=(32,))
        vae, flops = VAE(cfg).eval(), model_flops(cfg)
        for role, net, width in (("encoder", vae.encoder, cfg.input_dim), ("decoder", vae.decoder, cfg.latent_dim)):
            path = tmp_path / f"{arch}-{role}.onnx"
            torch.onnx.export(net, (torch.rand(2, width),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
            want = flops["encode" if role == "encoder" else "decode"] / 2
            assert graphs.graph_macs(graphs.inspect(path.read_bytes(), path))["float"] == want


def test_committed_tiny_model_still_belongs_to_its_weights():
    """tests/data/tiny-exported (what the tests without PyTorch use) is a real export of its weights: its graphs
    record the weights' hash and compute what PyTorch computes from them."""
    from vae_engine.runtime.engine import Engine

    from .conftest import TINY_EXPORTED

    sha = modeldir.weights_sha256(TINY_EXPORTED)
    cfg = modeldir.model_config(TINY_EXPORTED)
    for role in graphs.ROLES:
        for variant in ("fp32", "int8"):
            meta = graphs.load_graph(graphs.graph_path(TINY_EXPORTED, role, variant), role, cfg).metadata
            assert meta["vae_engine.weights_sha256"] == sha
    x = np.random.default_rng(0).random((8, cfg.input_dim), np.float32)
    ort_mu = Engine.load(TINY_EXPORTED, backend="onnxruntime", threads=2).encode(x)[0]
    ref_mu = Engine.load(TINY_EXPORTED, backend="torch", threads=2).encode(x)[0]
    np.testing.assert_allclose(ort_mu, ref_mu, atol=FP32_ATOL)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
def test_validation_tolerance_follows_each_outputs_scale(exported):
    """A graph whose outputs are large (a Gaussian decoder on data of order 10) is judged relative to their
    scale: the same relative rounding passes at any scale, and a real difference fails at any scale."""
    from vae_engine.export import tracing

    class Scaled(torch.nn.Module):
        def __init__(self, net, scale, offset=0.0):
            super().__init__()
            self.net, self.scale, self.offset = net, scale, offset

        def forward(self, z):
            return self.net(z) * self.scale + self.offset

    exported = exported[0]
    vae = modeldir.load_model(exported)
    cfg = modeldir.model_config(exported)
    z = np.random.default_rng(0).standard_normal((37, cfg.latent_dim)).astype(np.float32)
    for scale in (1.0, 40.0):
        path = exported / "scaled.onnx"
        torch.onnx.export(Scaled(vae.decoder, scale), (torch.from_numpy(z[:2]),), str(path), dynamo=False,
                          input_names=["z"], dynamic_axes={"z": {0: "batch"}})
        proto = onnx.load(path)
        assert tracing.validate(proto, Scaled(vae.decoder, scale * (1 + 3e-6)), z, FP32_ATOL, "d") < FP32_ATOL
        with pytest.raises(Exception, match="of the output's scale"):
            tracing.validate(proto, Scaled(vae.decoder, scale, offset=scale * 1e-3), z, FP32_ATOL, "d")
        path.unlink()
