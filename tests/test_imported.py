"""Bring your own VAE: a tiny randomly initialized diffusers AutoencoderKL (save_pretrained, no network) and a
user's own modules become model folders; every job and both server protocols run on them and agree with diffusers
(the reference) within fp32 tolerance; every bad declaration or source is one clear error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vae_engine import Engine, ModelConfig  # noqa: E402
from vae_engine.core.errors import DataError, ModelDirError, VaeEngineError  # noqa: E402
from vae_engine.data import sample_photos as photos  # noqa: E402
from vae_engine.export.imported import import_modules  # noqa: E402
from vae_engine.runtime import backends  # noqa: E402

from .conftest import one_line_error as _one_line  # noqa: E402

SIZE = (32, 32)
LATENT = (4, 8, 8)  # three blocks: the tiny model downsamples by 4, as SD's by 8
TOL = 1e-4


def one_line_error(args: list[str]) -> str:
    """The CLI's one `error:` line (exit 2, no traceback) for these arguments."""
    from typer.testing import CliRunner

    from vae_engine.cli import app

    return _one_line(CliRunner().invoke(app, args))


def tiny_autoencoder_kl():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                                   up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32).eval()


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    """(the diffusers folder, the model folder imported from it by the CLI, the AutoencoderKL)."""
    from typer.testing import CliRunner

    from vae_engine.cli import app

    root = tmp_path_factory.mktemp("kl")
    vae = tiny_autoencoder_kl()
    vae.save_pretrained(root / "diffusers")
    result = CliRunner().invoke(app, ["import", str(root / "diffusers"), "--out", str(root / "model"),
                                      "--size", f"{SIZE[0]},{SIZE[1]}"])
    assert result.exit_code == 0, result.output
    return root / "diffusers", root / "model", vae


def _reference(vae, x: np.ndarray):
    """diffusers itself: the scaled posterior mean and the decoded image in [0, 1], as a user of it computes them."""
    sf = vae.config.scaling_factor
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x).reshape(len(x), 3, *SIZE) * 2 - 1).latent_dist
        image = (vae.decode(dist.mean).sample / 2 + 0.5).clamp(0, 1)
    return (dist.mean * sf).numpy(), image.numpy(), (dist.logvar + 2 * np.log(sf)).numpy()


def test_the_folder_declares_the_import(kl):
    _, model, vae = kl
    doc = json.loads((model / "config.json").read_text())
    cfg = ModelConfig(**doc["model"])
    assert cfg.arch == "autoencoder-kl" and cfg.latent_shape == LATENT and cfg.input_shape == (3, *SIZE)
    assert cfg.likelihood == "none" and cfg.prior == "none"
    assert cfg.import_spec.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert cfg.import_spec.config["block_out_channels"] == [8, 16, 16]
    report = json.loads((model / "export_report.json").read_text())
    assert max(report["max_abs_err_vs_torch"].values()) < TOL
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "decoder.onnx", "encoder.onnx",
                                                       "export_report.json", "model.safetensors"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_every_path_equals_diffusers(kl, backend):
    _, model, vae = kl
    if backends.unavailable(backend, "fp32", "cpu", model):
        pytest.skip(backends.unavailable(backend, "fp32", "cpu", model))
    x = photos((3, *SIZE), 3)
    mu_ref, image_ref, logvar_ref = _reference(vae, x)
    engine = Engine.load(model, backend=backend, precision="fp32")
    mu, logvar = engine.encode(x)
    assert mu.shape == (3, int(np.prod(LATENT))) and engine.latent_shape == LATENT
    np.testing.assert_allclose(mu.reshape(mu_ref.shape), mu_ref, atol=TOL)
    np.testing.assert_allclose(logvar.reshape(mu_ref.shape), np.clip(logvar_ref, -16, 10), atol=1e-3)
    np.testing.assert_allclose(engine.decode(mu_ref).reshape(image_ref.shape), image_ref, atol=TOL)  # shaped z
    np.testing.assert_allclose(engine.reconstruct(x).reshape(image_ref.shape), image_ref, atol=TOL)
    if backend != "torch":  # items so large that a call holds few rows: no fused graph (merging costs seconds)
        fresh = Engine.load(model, backend=backend, precision="fp32")
        fresh.backend.chunk_rows = 4
        np.testing.assert_allclose(fresh.reconstruct(x).reshape(image_ref.shape), image_ref, atol=TOL)
        assert "reconstruct" not in fresh.backend.ends_in_mean
    uint8 = np.round(x * 255).astype(np.uint8).reshape(3, 3, *SIZE)  # images as files hold them
    np.testing.assert_allclose(engine.encode(uint8)[0], engine.encode(uint8.reshape(3, -1) / 255.0)[0], atol=1e-6)


def test_jobs_on_an_image_folder(kl, tmp_path):
    from PIL import Image

    from vae_engine.cli import app
    from vae_engine.jobs import batch

    _, model, vae = kl
    x = np.round(photos((3, *SIZE), 5) * 255).astype(np.uint8).reshape(5, 3, *SIZE)
    (tmp_path / "images").mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a.transpose(1, 2, 0)).save(tmp_path / "images" / f"{i}.png")
    from typer.testing import CliRunner

    run = CliRunner().invoke
    common = ["--backend", "onnxruntime", "--precision", "fp32"]
    assert run(app, ["encode", str(model), "-i", str(tmp_path / "images"), "-o", str(tmp_path / "z.npy"),
                     *common]).exit_code == 0
    z = np.load(tmp_path / "z.npy")
    mu_ref, image_ref, _ = _reference(vae, x.reshape(5, -1).astype(np.float32) / 255)
    assert z.shape == (5, *LATENT)
    np.testing.assert_allclose(z, mu_ref, atol=TOL)
    assert run(app, ["decode", str(model), "-i", str(tmp_path / "z.npy"), "-o", str(tmp_path / "x.npy"),
                     *common]).exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "x.npy").reshape(image_ref.shape), image_ref, atol=TOL)
    # safetensors shards, as diffusion trainers keep latents: one tensor "latents", read back by decode
    from safetensors.numpy import load_file

    assert run(app, ["encode", str(model), "-i", str(tmp_path / "images"), "-o", str(tmp_path / "z.safetensors"),
                     *common]).exit_code == 0
    assert np.array_equal(load_file(tmp_path / "z.safetensors")["latents"], z)
    assert run(app, ["decode", str(model), "-i", str(tmp_path / "z.safetensors"), "-o",
                     str(tmp_path / "x.safetensors"), *common]).exit_code == 0
    assert np.array_equal(load_file(tmp_path / "x.safetensors")["items"], np.load(tmp_path / "x.npy"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    bad = str(tmp_path / "bad.safetensors")
    assert "not a readable .safetensors" in one_line_error(["decode", str(model), "-i", bad, "-o",
                                                            str(tmp_path / "y.npy")])
    result = run(app, ["reconstruct", str(model), "-i", str(tmp_path / "images"), "-o", str(tmp_path / "r.png"),
                       *common])
    assert result.exit_code == 0 and (tmp_path / "r.png").stat().st_size > 0
    # latents back to a folder of images, one PNG per item (what a diffusion pipeline's user looks at)
    assert run(app, ["decode", str(model), "-i", str(tmp_path / "z.npy"), "-o", str(tmp_path / "decoded"),
                     "--batch-size", "2", *common]).exit_code == 0
    files = sorted((tmp_path / "decoded").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    pngs = np.stack([np.asarray(Image.open(f)) for f in files]).transpose(0, 3, 1, 2)
    assert np.array_equal(pngs, np.round(np.clip(np.load(tmp_path / "x.npy"), 0, 1) * 255).astype(np.uint8)
                          .reshape(pngs.shape))
    assert "not an empty folder" in one_line_error(["decode", str(model), "-i", str(tmp_path / "z.npy"), "-o",
                                                    str(tmp_path / "decoded")])
    assert "with --ray" in one_line_error(["decode", str(model), "-i", str(tmp_path / "z.npy"), "-o",
                                           str(tmp_path / "other"), "--ray", "local"])
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".*vae-tmp*"))
    # a posterior sample per image: its own stream, whatever the batch (--with-logvar keeps the latent shape too)
    engine = Engine.load(model, backend="onnxruntime", precision="fp32")
    source = batch.open_items(tmp_path / "images", engine.cfg)
    fn = batch.make_job_fn("encode", engine, {"sample": True, "with_logvar": True, "seed": 3})
    for size in (1, 2, 5):
        batch.stream(source, fn, tmp_path / f"s{size}.npy", batch.item_shape("encode", engine.cfg,
                                                                              {"with_logvar": True}), size)
    s = [np.load(tmp_path / f"s{size}.npy") for size in (1, 2, 5)]
    # photos of another size (and aspect): --fit scales each to cover the model's size and centre-crops it
    (tmp_path / "large").mkdir()
    for i, a in enumerate(x[:2]):
        Image.fromarray(a.transpose(1, 2, 0)).resize((48, 40)).save(tmp_path / "large" / f"{i}.png")
    assert "--fit" in one_line_error(["encode", str(model), "-i", str(tmp_path / "large"), "-o",
                                      str(tmp_path / "l.npy"), *common])
    assert run(app, ["encode", str(model), "-i", str(tmp_path / "large"), "-o", str(tmp_path / "l.npy"), "--fit",
                     *common]).exit_code == 0
    assert np.load(tmp_path / "l.npy").shape == (2, *LATENT)
    assert s[0].shape == (5, 2, *LATENT) and np.array_equal(s[0], s[1]) and np.array_equal(s[0], s[2])
    assert not np.allclose(s[0][:, 0], z)


@pytest.mark.parametrize("job", [["score", "-i", "{x}", "-o", "{out}/s.npy"],
                                 ["sample", "-n", "2", "-o", "{out}/s.npy"], ["evaluate"]])
def test_what_needs_a_likelihood_or_prior_is_one_error(kl, tmp_path, job):
    _, model, _ = kl
    np.save(tmp_path / "x.npy", np.zeros((2, 3, *SIZE), np.uint8))
    args = [a.format(x=tmp_path / "x.npy", out=tmp_path) for a in job]
    message = one_line_error([args[0], str(model), *args[1:]])
    assert "declares no" in message and "encode, decode and reconstruct run on it" in message
    assert not (tmp_path / "s.npy").exists()


def test_both_server_protocols(kl):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vae_engine.serving.server import create_app

    _, model, vae = kl
    x = photos((3, *SIZE), 2)
    mu_ref, image_ref, _ = _reference(vae, x)
    name = model.name
    with TestClient(create_app(model, backend="onnxruntime", precision="fp32")) as c:
        meta = c.get(f"/v2/models/{name}-encode").json()
        assert meta["outputs"][0]["shape"] == [-1, *LATENT] and meta["inputs"][0]["shape"] == [-1, 3, *SIZE]
        assert c.get(f"/v2/models/{name}-sample").status_code == 404  # no prior: not offered
        r = c.post(f"/v2/models/{name}-encode/infer", json={"inputs": [
            {"name": "items", "datatype": "FP32", "shape": [2, 3, *SIZE], "data": x.reshape(-1).tolist()}]})
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["mu"]["shape"] == [2, *LATENT]
        np.testing.assert_allclose(np.array(out["mu"]["data"], np.float32).reshape(mu_ref.shape), mu_ref, atol=TOL)
        r = c.post(f"/v2/models/{name}-decode/infer", json={"inputs": [
            {"name": "z", "datatype": "FP32", "shape": [2, *LATENT], "data": mu_ref.reshape(-1).tolist()}]})
        items = r.json()["outputs"][0]
        assert items["shape"] == [2, 3, *SIZE]
        np.testing.assert_allclose(np.array(items["data"], np.float32).reshape(image_ref.shape), image_ref, atol=TOL)
        r = c.post("/v1/reconstruct", json={"items": x.tolist()})
        np.testing.assert_allclose(np.array(r.json()["items"]).reshape(image_ref.shape), image_ref, atol=TOL)
        r = c.post("/v1/score", json={"items": x.tolist()})
        assert r.status_code == 422 and "declares no" in r.json()["error"]


def test_served_to_real_kserve_clients_over_rest_and_grpc(kl):
    """`vae-engine serve` on the imported folder, driven by tritonclient (a client vae-engine did not write) over
    KServe v2 REST and gRPC: the latent shape in the metadata and the tensors, the answers equal diffusers'."""
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import socket

    from .conftest import start_serve

    _, model, vae = kl
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        grpc_port = s.getsockname()[1]
    proc, url = start_serve([str(model), "--backend", "onnxruntime", "--precision", "fp32",
                             "--grpc-port", str(grpc_port)])
    try:
        x = photos((3, *SIZE), 2).reshape(2, 3, *SIZE)
        mu_ref, image_ref, _ = _reference(vae, x.reshape(2, -1))
        name = model.name
        for lib, client in ((httpclient, httpclient.InferenceServerClient(url.removeprefix("http://"))),
                            (grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))):
            meta = client.get_model_metadata(f"{name}-encode")
            outputs = meta["outputs"] if isinstance(meta, dict) else [
                {"name": o.name, "shape": list(o.shape)} for o in meta.outputs]
            assert [list(o["shape"]) for o in outputs] == [[-1, *LATENT]] * 2
            t = lib.InferInput("items", list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            mu = client.infer(f"{name}-encode", [t]).as_numpy("mu")
            assert mu.shape == (2, *LATENT)
            np.testing.assert_allclose(mu, mu_ref, atol=TOL)
            z = lib.InferInput("z", list(mu.shape), "FP32")
            z.set_data_from_numpy(mu)
            items = client.infer(f"{name}-decode", [z]).as_numpy("items")
            np.testing.assert_allclose(items.reshape(image_ref.shape), image_ref, atol=2 * TOL)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow  # ~15 s: the bench measures the GEMM peaks and its kernel table too
def test_bench_runs_on_an_imported_folder(kl, tmp_path):
    """`vae-engine bench` counts an imported model's work on its graphs (no trainer network to rebuild)."""
    from typer.testing import CliRunner

    from vae_engine.cli import app

    _, model, _ = kl
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(model), "--quick", "--backends", "ort-fp32", "--batches", "1,2",
                                      "--ops", "encode,decode", "--threads", "1", "--json", str(out),
                                      "--plot", str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(out.read_text())["results"] if r.get("gflops")]
    assert rows and all(r["gflops"] > 0 for r in rows)


def test_auto_judges_a_model_without_likelihood_by_its_reconstructions(kl, tmp_path):
    """No nats to judge a path by: auto measures each approximate path's mean reconstruction change against fp32
    on sample photos and keeps it within one grey level (on a CPU class with native bf16, pretended where this one
    is not: OpenVINO then runs bf16 emulated, slowly, but the same arithmetic is judged)."""
    from vae_engine.core import config, hardware
    from vae_engine.runtime import tuning

    _, model, _ = kl
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    bf16 = hardware.Machine("AMD EPYC (Zen 4)", frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}))
    with hardware.pretend(bf16):
        engine = Engine.load(copy, precision="auto", batch_size=4, threads=1)
    decision = engine.decision
    assert decision["budget"] == "reconstruction"
    approximate = [r for r in decision["measurements"] if r["precision"] != "fp32"]
    for path, cost in decision["accuracy"].items():
        assert set(cost) == {"reconstruction_change_pixels", "reconstruction_change_se_pixels",
                             "max_item_reconstruction_change_pixels"}, path
        assert 0 <= cost["reconstruction_change_pixels"] < 0.05
    for row in approximate:  # only paths within the budget are timed
        assert config.within_budget(row["reconstruction_change_pixels"], row["reconstruction_change_se_pixels"],
                                    config.RECONSTRUCTION_BUDGET)
    assert "reconstruction change of 0.0039" in engine.path
    if backends.openvino_installed():
        assert "openvino/bf16" in decision["accuracy"]
    assert tuning.within({"precision": "bf16", "reconstruction_change_pixels": 0.01}, 1.0) is False


def test_bad_sources_are_one_error(kl, tmp_path):
    folder, model, vae = kl
    assert "not found" in one_line_error(["import", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert "already holds a model" in one_line_error(["import", str(folder), "--out", str(model), "--size", "32,32"])
    assert "multiples of 4" in one_line_error(["import", str(folder), "--out", str(tmp_path / "m"), "--size", "30,30"])
    pickled = tmp_path / "pickled"
    vae.save_pretrained(pickled, safe_serialization=False)  # diffusion_pytorch_model.bin: a pickle
    message = one_line_error(["import", str(pickled), "--out", str(tmp_path / "m")])
    assert "safetensors" in message and "pickle" in message
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = damaged / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    message = one_line_error(["import", str(damaged), "--out", str(tmp_path / "m")])
    assert "diffusers cannot load it" in message and "pickle" not in message
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert "not an AutoencoderKL" in one_line_error(["import", str(other), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_tampered_folder_is_refused(kl, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, model, _ = kl
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    tensors = load_file(bad / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = np.zeros((3,), np.float32)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ModelDirError, match="config.json needs"):
        Engine.load(bad, backend="torch", precision="fp32")
    doc = json.loads((model / "config.json").read_text())
    for key, value, match in (("block_out_channels", [100000, 100000], "between 1 and 4,096"),
                              ("block_out_channels", [4096] * 8, "over the limit"),
                              ("_class_name", "UNet2DModel", "not an AutoencoderKL")):
        doc2 = json.loads(json.dumps(doc))
        doc2["model"]["imported"]["config"][key] = value
        (bad / "config.json").write_text(json.dumps(doc2))
        with pytest.raises(VaeEngineError, match=match):
            Engine.load(bad, backend="torch", precision="fp32")
    for key, value in (("scaling_factor", -1.0), ("scaling_factor", "x"), ("input_range", [1, -1]),
                       ("source", "pickle")):
        doc2 = json.loads(json.dumps(doc))
        doc2["model"]["imported"][key] = value
        (bad / "config.json").write_text(json.dumps(doc2))
        with pytest.raises(ModelDirError, match="'model' section is invalid"):
            Engine.load(bad, backend="onnxruntime", precision="fp32")


class _Encoder(torch.nn.Module):
    def __init__(self, latent=(2, 4, 4), outputs=2):
        super().__init__()
        self.conv, self.latent, self.outputs = torch.nn.Conv2d(1, 2 * latent[0], 3, stride=2, padding=1), latent, \
            outputs

    def forward(self, x):
        h = self.conv(x)
        return h.chunk(2, dim=1) if self.outputs == 2 else h


class _Decoder(torch.nn.Module):
    def __init__(self, out=64):
        super().__init__()
        self.net, self.out = torch.nn.Linear(32, out), out

    def forward(self, z):
        return self.net(z.flatten(1))


def test_your_own_modules(tmp_path):
    torch.manual_seed(0)
    enc, dec = _Encoder(), _Decoder()
    report = import_modules(enc, dec, tmp_path / "m", (1, 8, 8), (2, 4, 4), likelihood="bernoulli", prior="normal",
                            scaling_factor=2.0)
    assert max(report["max_abs_err_vs_torch"].values()) < TOL
    engine = Engine.load(tmp_path / "m", backend="onnxruntime", precision="fp32")
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        mu_ref, logvar_ref = enc(torch.from_numpy(x))
        logits_ref = dec(mu_ref)
    mu, logvar = engine.encode(x)
    np.testing.assert_allclose(mu, 2.0 * mu_ref.flatten(1).numpy(), atol=TOL)  # scaled latents
    np.testing.assert_allclose(logvar, (logvar_ref + 2 * np.log(2.0)).clamp(-16, 10).flatten(1).numpy(), atol=TOL)
    np.testing.assert_allclose(engine.decode(mu, params=True), logits_ref.numpy(), atol=TOL)
    nll = -engine.log_likelihood(x, 8)  # a likelihood and a prior declared: scores and samples work
    assert nll.shape == (3,) and np.isfinite(nll).all()
    assert engine.sample(2).shape == (2, 64)
    with pytest.raises(VaeEngineError, match="no code for"):
        Engine.load(tmp_path / "m", backend="torch", precision="fp32")


def test_modules_of_flat_items(tmp_path):
    """An MLP encoder of 20 features: latents (2, 3), checked on seeded values, scored with a Gaussian decoder."""
    torch.manual_seed(0)

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(20, 12)

        def forward(self, x):
            mu, logvar = self.net(x).chunk(2, dim=1)
            return mu.reshape(-1, 2, 3), logvar.reshape(-1, 2, 3)

    dec = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 40))
    import_modules(Enc(), dec, tmp_path / "m", (20,), (2, 3), likelihood="gaussian", prior="normal")
    engine = Engine.load(tmp_path / "m", backend="onnxruntime", precision="fp32")
    x = np.random.default_rng(1).standard_normal((4, 20)).astype(np.float32)
    assert engine.encode(x)[0].shape == (4, 6) and np.isfinite(engine.log_likelihood(x, 4)).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"latent_shape": (3, 4, 4)}, "latent_shape declares"),
    ({"encoder": _Encoder(outputs=1)}, "must return \\(mean, log-variance\\)"),
    ({"decoder": _Decoder(out=10)}, "returns 10 values per item"),
    ({"input_shape": (3, 8, 8)}, "check input_shape"),
    ({"likelihood": "poisson"}, "unknown likelihood"),
    ({"output_range": (-1.0, 1.0)}, "output_range is for a decoder"),
    ({"scaling_factor": 0.0}, "scaling_factor must be positive"),
    ({"input_range": (1.0, 0.0)}, "low < high"),
    ({"encoder": "not a module"}, "must be a torch.nn.Module"),
])
def test_each_bad_declaration_is_one_error(tmp_path, kwargs, match):
    args = {"encoder": _Encoder(), "decoder": _Decoder(), "out": tmp_path / "m", "input_shape": (1, 8, 8),
            "latent_shape": (2, 4, 4), "likelihood": "bernoulli", "prior": "normal", **kwargs}
    with pytest.raises(VaeEngineError, match=match) as info:
        import_modules(**args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


def test_latents_of_a_shape_by_the_input_rule():
    from vae_engine import data

    z = np.zeros((2, 4, 8, 8), np.float32)
    assert data.latents(z, (4, 8, 8)).shape == (2, 256)
    assert data.latents(z.reshape(2, -1), (4, 8, 8)).shape == (2, 256)
    with pytest.raises(DataError, match=r"\(N, 4, 8, 8\) or \(N, 256\)"):
        data.latents(z.reshape(2, 8, 4, 8), (4, 8, 8))


def _int8_weights_and_ops(path) -> tuple[list, set]:
    import onnx

    model = onnx.load(path)
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return weights, {n.op_type for n in model.graph.node}


def test_int8_of_an_imported_model(kl, tmp_path, monkeypatch):
    """`export --quantize int8` on an imported folder: QDQ layers grown within auto's reconstruction budget, 7-bit
    weights (exact on CPUs without VNNI), an item's answer independent of its batch, and auto races the path."""
    from typer.testing import CliRunner

    from vae_engine.cli import app
    from vae_engine.core import config
    from vae_engine.export import imported
    from vae_engine.runtime import tuning

    monkeypatch.setattr(imported, "SPEEDUP_TO_KEEP", 0.0)  # a 32x32 model's int8 graphs are not faster: keep them
    _, model, _ = kl
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    result = CliRunner().invoke(app, ["export", str(copy), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "int8: encoder" in result.output and "reconstruction change" in result.output
    q = json.loads((copy / "export_report.json").read_text())["int8"]
    assert json.loads((copy / "export_report.json").read_text())["max_abs_err_vs_torch"]  # import's report kept
    kept = q["int8_layers"]
    assert kept["encoder"] or kept["decoder"]
    assert all(len(kept[r]) <= q["layers"][r] for r in kept)
    acc = q["accuracy"]
    assert config.within_budget(acc["reconstruction_change_pixels"], acc["reconstruction_change_se_pixels"],
                                config.RECONSTRUCTION_BUDGET)
    assert "sample photos" in q["calibration"] and len(q["candidates"]) >= 2
    for role in ("encoder", "decoder"):
        weights, ops = _int8_weights_and_ops(copy / f"{role}.int8.onnx")
        assert ("DequantizeLinear" in ops) == bool(kept[role])
        assert all(np.abs(w.astype(int)).max() <= 64 for w in weights)  # 7 bits: no int16 overflow sans VNNI
    engine = Engine.load(copy, backend="onnxruntime", precision="int8", threads=1)
    x = photos((3, *SIZE), 4)
    whole = engine.encode(x)[0]
    np.testing.assert_allclose(engine.encode(x[2:3])[0], whole[2:3], atol=1e-6)  # static ranges: batch-free
    fp32 = Engine.load(copy, backend="onnxruntime", precision="fp32", threads=1)
    change = np.abs(engine.reconstruct(x) - fp32.reconstruct(x)).mean()
    assert change == pytest.approx(acc["reconstruction_change_pixels"], rel=1e-3)  # the report measured this
    paths, _ = tuning.candidates(copy, "auto", "cpu")
    assert ("onnxruntime", "int8") in paths


def test_int8_that_gains_nothing_is_not_written(kl, tmp_path, monkeypatch):
    """No layer set both within the budget and faster: a warning, no int8 graphs (an earlier export's removed),
    so auto does not time a copy of fp32."""
    from typer.testing import CliRunner

    from vae_engine.cli import app
    from vae_engine.export import imported

    monkeypatch.setattr(imported, "SPEEDUP_TO_KEEP", float("inf"))
    _, model, _ = kl
    copy = tmp_path / "m"
    shutil.copytree(model, copy)
    shutil.copy(copy / "encoder.onnx", copy / "encoder.int8.onnx")  # a stale variant
    (copy / "export_report.json").write_text("[1, 2")  # and a damaged report: written anew
    result = CliRunner().invoke(app, ["export", str(copy), "--quantize", "int8", "--optimize"])
    assert result.exit_code == 0, result.output
    assert "no int8 graphs written" in " ".join(result.output.split())
    assert not list(copy.glob("*.int8.onnx")) and (copy / "decoder.opt.onnx").is_file()
    assert "optimized: max |err| against fp32" in result.output
    assert "int8" in json.loads((copy / "export_report.json").read_text())
    assert "--fp16" in one_line_error(["export", str(copy), "--fp16"])
    assert "--quantize int8 or --optimize" in one_line_error(["export", str(copy)])


def test_int8_of_your_modules_is_judged_in_nats(tmp_path, monkeypatch):
    """Modules with a likelihood: their int8 layers (a Conv, a Gemm) are judged by the NLL change in nats."""
    from vae_engine.core import config
    from vae_engine.export import imported

    monkeypatch.setattr(imported, "SPEEDUP_TO_KEEP", 0.0)
    torch.manual_seed(0)
    import_modules(_Encoder(), _Decoder(), tmp_path / "m", (1, 8, 8), (2, 4, 4), likelihood="bernoulli",
                   prior="normal")
    q = imported.export_variants(tmp_path / "m", quantize="int8")["int8"]
    assert "nats" in q["budget"] and q["layers"] == {"encoder": 1, "decoder": 1}
    acc = q["accuracy"]
    assert config.within_budget(acc["nll_change_nats"], acc["nll_change_se_nats"], config.DEFAULT_BUDGET)
    assert Engine.load(tmp_path / "m", backend="onnxruntime", precision="int8").log_likelihood(
        np.random.default_rng(0).random((2, 64), dtype=np.float32), 4).shape == (2,)


def test_int8_layers_grow_by_bisection():
    """`qdq.grow` keeps every block that fits and leaves out exactly the layers that do not (costs add up)."""
    from vae_engine.export.qdq import grow

    cost = {f"l{i}": c for i, c in enumerate([1, 1, 9, 1, 1, 1, 8, 1])}
    calls = []

    def fits(trial):
        calls.append(trial)
        return sum(cost[n] for n in trial) <= 7

    chosen = grow([], list(cost), fits)
    assert sorted(chosen) == ["l0", "l1", "l3", "l4", "l5", "l7"] and sum(cost[n] for n in chosen) <= 7
    assert len(calls) < 2 * len(cost)
    assert grow([], list(cost), lambda trial: True) == list(cost)
    assert grow([], [], fits) == []


def test_modules_with_a_likelihood_but_no_prior_are_judged_by_reconstructions(tmp_path, monkeypatch):
    """Without a prior a model cannot be scored, so its approximate paths are judged by their reconstructions (as
    an AutoencoderKL's are), not in nats: auto's reference and int8 export's search both."""
    from vae_engine.export import imported
    from vae_engine.runtime import tuning

    monkeypatch.setattr(imported, "SPEEDUP_TO_KEEP", 0.0)
    torch.manual_seed(0)
    import_modules(_Encoder(), _Decoder(), tmp_path / "m", (1, 8, 8), (2, 4, 4), likelihood="bernoulli", prior="none")
    cfg = ModelConfig(**json.loads((tmp_path / "m" / "config.json").read_text())["model"])
    assert tuning.by_reconstruction(cfg)
    ref = tuning.reference(Engine.load, tmp_path / "m", 1, "onnxruntime")
    assert "reconstruction" in ref and ref["reconstruction"].shape == (tuning.PHOTO_ITEMS, 64)
    q = imported.export_variants(tmp_path / "m", quantize="int8")["int8"]
    assert "reconstruction change" in q["budget"]
    assert all("reconstruction_change_pixels" in row for row in q["candidates"])
