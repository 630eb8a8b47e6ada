"""The path matrix: every batch job, `evaluate` and the server's endpoints, through every (backend, precision,
device) the backends implement, each forced, on every input kind the README lists, against the torch fp32
reference within that precision's tolerance. A path that cannot run here is a skip naming what is missing
(`backends.unavailable`), so every CI log (`pytest -rs`) shows what was covered.

The reference is the same job on the torch fp32 path fed the items as an in-memory float32 array, so a reader
that changes a value, and a backend that mishandles an input's memory (a read-only memory map, a request's bytes)
or its precision, both show up as a difference.
"""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import idx_bytes, one_line_error
from vae_engine import data
from vae_engine.data import readers
from vae_engine.jobs import batch as jobs
from vae_engine.runtime import backends
from vae_engine.runtime.engine import Engine

N = 24  # items per input kind: every chunking edge is tested elsewhere, here it is the paths that matter
BATCH = 10  # job batch size: three chunks, the last one short
K = 8  # importance samples of the k > 1 score
SEED = 3

# Largest differences from the torch fp32 reference each precision may show, for this tiny model (784-32-4,
# Bernoulli): latents (mu, logvar) and E[x|z] pixel probabilities in absolute terms, scores in nats per item
# (a 784-pixel log-likelihood of ~150-550 nats sums 784 rounding errors). fp32: reassociation only. fp16: a
# 10-bit mantissa. bf16: an 8-bit mantissa in every GEMM. int8: per-tensor dynamic quantization (without VNNI
# the u8 x s8 products can saturate, so other CPUs show more). Largest differences measured over the whole matrix
# on an AMX Xeon (latent / mean / nats): fp32 2.4e-7 / 8.9e-8 / 8e-5; fp16 1.3e-4 / 1.3e-4 / 0.005; bf16
# 1.1e-3 / 1.3e-3 / 0.13; int8 5.9e-4 / 1.8e-3 / 0.19. The tolerances leave 5-20x room for other CPUs' kernels.
TOLERANCE = {
    "fp32": {"latent": 1e-5, "mean": 1e-5, "nats": 2e-3},
    "fp16": {"latent": 2e-3, "mean": 2e-3, "nats": 0.1},
    "bf16": {"latent": 2e-2, "mean": 2e-2, "nats": 2.0},
    "int8": {"latent": 2e-2, "mean": 2e-2, "nats": 3.0},
}
PATHS = [pytest.param(p, id="/".join(p)) for p in backends.PATHS]


@pytest.fixture(scope="module")
def model(exported_model, tmp_path_factory) -> Path:
    """The tiny model with every graph variant (fp32, int8, fp16) and a stored detector (detector.json)."""
    from vae_engine.export.exporter import export
    from vae_engine.jobs import detect

    out = tmp_path_factory.mktemp("paths") / "m"
    shutil.copytree(exported_model, out)
    export(out, quantize="int8", fp16=True)
    detect.store_threshold(out, "nll", 0.1, k=K)
    return out


@pytest.fixture(scope="module")
def images(tiny_data) -> np.ndarray:
    return data.load_split(tiny_data, "test")[0][:N]  # uint8 (N, 28, 28)


def _write_kinds(folder: Path, u8: np.ndarray) -> dict[str, Path]:
    """The same N items in every input format the README lists."""
    folder.mkdir(parents=True, exist_ok=True)
    x = u8.reshape(len(u8), -1).astype(np.float32) / np.float32(255)
    paths = {"uint8.npy": folder / "u8.npy", "float32.npy (read-only memory map)": folder / "f32.npy",
             ".npz": folder / "items.npz", ".csv": folder / "items.csv", ".parquet": folder / "items.parquet",
             "IDX .gz": folder / "images-idx3-ubyte.gz", "PNG folder": folder / "png"}
    np.save(paths["uint8.npy"], u8)
    np.save(paths["float32.npy (read-only memory map)"], x)
    np.savez(paths[".npz"], x=u8)
    header = ",".join(f"p{i}" for i in range(x.shape[1]))
    np.savetxt(paths[".csv"], x, fmt="%.9g", delimiter=",", header=header, comments="")  # float32 round-trips
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({f"p{i}": x[:, i] for i in range(x.shape[1])}), paths[".parquet"])
    except ImportError:
        del paths[".parquet"]
    paths["IDX .gz"].write_bytes(gzip.compress(idx_bytes(u8, 2051)))
    from PIL import Image

    paths["PNG folder"].mkdir()
    for i, img in enumerate(u8):
        Image.fromarray(img).save(paths["PNG folder"] / f"{i:03d}.png")
    return paths


@pytest.fixture(scope="module")
def kinds(images, tmp_path_factory) -> dict[str, Path]:
    return _write_kinds(tmp_path_factory.mktemp("kinds"), images)


@pytest.fixture(scope="module")
def x(images) -> np.ndarray:
    return images.reshape(N, -1).astype(np.float32) / np.float32(255)  # writable, in memory: the reference input


@pytest.fixture(scope="module")
def z(model, x) -> np.ndarray:
    return Engine.load(model, backend="torch", precision="fp32", threads=2).encode(x)[0]


_engines: dict = {}


def _engine(model: Path, path: tuple[str, str, str]) -> Engine:
    backend, precision, device = path
    why = backends.unavailable(backend, precision, device, model)
    if why:
        pytest.skip(f"{'/'.join(path)}: {why}")
    if (model, path) not in _engines:
        _engines[model, path] = Engine.load(model, backend=backend, precision=precision, device=device, threads=2)
    return _engines[model, path]


def _reference(model: Path) -> Engine:
    return _engine(model, ("torch", "fp32", "cpu"))


ITEM_JOBS = {  # job name -> (job, params, quantity compared)
    "encode": ("encode", {}, "latent"),
    "encode --sample --with-logvar": ("encode", {"sample": True, "with_logvar": True, "seed": SEED}, "latent"),
    "reconstruct": ("reconstruct", {}, "mean"),
    "score k=1": ("score", {"k": 1, "seed": SEED}, "nats"),
    f"score k={K}": ("score", {"k": K, "seed": SEED}, "nats"),
}


def _run_job(engine: Engine, job: str, params: dict, source: jobs.Source, out: Path) -> np.ndarray:
    jobs.stream(source, jobs.make_job_fn(job, engine, params), out, jobs.item_shape(job, engine.cfg, params), BATCH)
    return np.load(out)


def _check(got: np.ndarray, want: np.ndarray, precision: str, quantity: str, what: str) -> None:
    assert got.shape == want.shape, what
    assert np.isfinite(got).all(), what
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert diff <= TOLERANCE[precision][quantity], f"{what}: max difference {diff:.3g} from torch fp32"


def test_the_read_only_kind_is_read_only(kinds):
    """The float32 .npy kind really reaches the jobs as a read-only memory map (what broke OpenVINO)."""
    arr = readers.load_npy(kinds["float32.npy (read-only memory map)"])
    assert isinstance(arr, np.memmap) and not arr.flags.writeable


def test_every_kind_reads_the_same_items(model, kinds, x):
    cfg = _reference(model).cfg
    for kind, path in kinds.items():
        source = jobs.open_items(path, cfg)
        got = np.concatenate([chunk for _, chunk in source.chunks(BATCH)])
        np.testing.assert_array_equal(got, x, err_msg=kind)


def test_one_image_file_is_one_item(model, kinds, x, tmp_path):
    """A single PNG given as the input (jobs and `readers.read`, e.g. train/evaluate --data) is one item, read as
    the folder reads it; a file that only looks like one is one error line."""
    from typer.testing import CliRunner

    from vae_engine.cli import app

    cfg = _reference(model).cfg
    first = sorted(kinds["PNG folder"].iterdir())[0]
    source = jobs.open_items(first, cfg)
    assert source.n == 1
    np.testing.assert_array_equal(np.concatenate([c for _, c in source.chunks(BATCH)]), x[:1])
    np.testing.assert_array_equal(readers.read(first)[0].reshape(1, -1) / np.float32(255), x[:1])
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = CliRunner().invoke(app, ["encode", str(model), "-i", str(tmp_path / "fake.png"), "-o",
                                      str(tmp_path / "z.npy")])
    one_line_error(result, "not a readable image")
    assert not (tmp_path / "z.npy").exists()


def _item_jobs_match(model: Path, kinds: dict[str, Path], x: np.ndarray, path, tmp_path: Path) -> None:
    """Every item job on every input kind through `path` equals the torch fp32 job on x held in memory."""
    engine, ref = _engine(model, path), _reference(model)
    for name, (job, params, quantity) in ITEM_JOBS.items():
        want = _run_job(ref, job, params, jobs.Source("x", N, x.shape[1], lambda i, j: x[i:j]),
                        tmp_path / "ref.npy")
        for kind, src in kinds.items():
            got = _run_job(engine, job, params, jobs.open_items(src, engine.cfg), tmp_path / "out.npy")
            _check(got, want, path[1], quantity, f"{name} on {kind}")


@pytest.mark.parametrize("path", PATHS)
def test_item_jobs_on_every_input_kind(model, kinds, x, path, tmp_path):
    _item_jobs_match(model, kinds, x, path, tmp_path)


@pytest.mark.parametrize("path", PATHS)
def test_latent_jobs(model, z, path, tmp_path):
    engine, ref = _engine(model, path), _reference(model)
    latents = tmp_path / "z.npy"
    np.save(latents, z)  # read back as a read-only memory map, as the decode job reads it
    for job, params in (("decode", {}), ("sample", {"seed": SEED})):
        want = _run_job(ref, job, params, jobs.open_input(job, latents, ref.cfg, N), tmp_path / "ref.npy")
        got = _run_job(engine, job, params, jobs.open_input(job, latents, engine.cfg, N), tmp_path / "out.npy")
        _check(got, want, path[1], "mean", job)


@pytest.mark.parametrize("path", PATHS)
def test_detect_on_every_input_kind(model, kinds, path, tmp_path):
    from vae_engine.jobs import detect

    backend, precision, device = path
    _engine(model, path)  # skips the paths that cannot run here
    if device != "cpu":
        pytest.skip("detect runs on the CPU")

    def scores(kind_path: Path, backend: str, precision: str) -> np.ndarray:
        detect.run(model, kind_path, tmp_path / "flags.npy", tmp_path / "scores.npy", None, None, None, None, 2,
                   backend, precision)
        flags, s = np.load(tmp_path / "flags.npy"), np.load(tmp_path / "scores.npy")
        assert set(np.unique(flags)) <= {-1, 1} and len(flags) == N
        return s

    want = scores(kinds["uint8.npy"], "torch", "fp32")
    for kind, src in kinds.items():
        _check(scores(src, backend, precision), want, precision, "nats", f"detect on {kind}")


@pytest.mark.parametrize("path", PATHS)
def test_evaluate(model, path):
    from vae_engine.jobs.evaluate import evaluate_model

    backend, precision, device = path
    _engine(model, path)
    kw = {"k": K, "limit": 16, "seed": SEED, "threads": 2}
    want = evaluate_model(model, backend="torch", precision="fp32", **kw)
    got = evaluate_model(model, backend=backend, precision=precision, device=device, **kw)
    assert got["n"] == want["n"] == 16
    for key in ("test_nelbo", "test_nll"):
        _check(np.asarray(got[key]), np.asarray(want[key]), precision, "nats", f"evaluate {key}")
    # its work: the encoder twice and the decoder k + 1 times per item, at the precisions the path runs
    from vae_engine import modeldir
    from vae_engine.perf.work import model_flops

    flops = model_flops(modeldir.model_config(model))
    macs = got["work"]["multiply_adds"]
    assert sum(macs.values()) == pytest.approx(16 * (2 * flops["encode"] + (K + 1) * flops["decode"]) / 2)
    prefix = "" if device == "cpu" else "cuda-"
    assert set(macs) == ({prefix + "int8", prefix + "fp32"} if precision == "int8" else {prefix + precision})
    work = got["work"]
    if work["limit_seconds"] is not None:
        assert work["fraction_of_limit"] > 0  # times are rounded to milliseconds: compare in seconds
        assert work["fraction_of_limit"] * got["seconds"] == pytest.approx(work["limit_seconds"], abs=2e-3)


def test_evaluate_auto_backend(model, tmp_path):
    """`evaluate`'s default --backend auto: ONNX Runtime where the graphs are exported (the reference's numbers),
    the PyTorch reference where they are not, torch on a GPU (scores next to its decoder)."""
    import shutil

    from vae_engine.jobs.evaluate import evaluate_model

    kw = {"k": K, "limit": 8, "seed": SEED, "threads": 2}
    got, want = evaluate_model(model, **kw), evaluate_model(model, backend="torch", **kw)
    assert got["path"] == "onnxruntime/fp32" and want["path"] == "torch/fp32 (reference)"
    np.testing.assert_allclose(got["test_nll"], want["test_nll"], atol=1e-3)
    bare = shutil.copytree(model, tmp_path / "bare")
    for f in bare.glob("*.onnx"):
        f.unlink()
    assert evaluate_model(bare, **kw)["path"] == "torch/fp32 (reference)"
    from vae_engine.runtime.backends import default_backend  # the one default, for evaluate and every job

    assert default_backend(model, "fp32", "cuda") == default_backend(model, "fp16", "cuda:1") == "torch"
    assert default_backend(model, "fp32", "cpu") == "onnxruntime" and default_backend(bare, "fp32", "cpu") == "torch"
    assert default_backend(model, "int8", "cpu") == "onnxruntime"


@pytest.mark.parametrize("path", PATHS)
def test_cli_jobs_forced_path(model, kinds, x, z, path, tmp_path):
    """The CLI as a user runs it, each path forced with --backend/--precision, on the read-only float input."""
    from typer.testing import CliRunner

    from vae_engine.cli import app

    backend, precision, device = path
    engine, ref = _engine(model, path), _reference(model)
    src = kinds["float32.npy (read-only memory map)"]
    np.save(tmp_path / "z.npy", z)
    force = ["--backend", backend, "--precision", precision, "--device", device, "--threads", "2"]
    runs = {  # command line -> (reference job, params, input, quantity)
        "encode": (["encode", str(model), "-i", str(src)], ("encode", {}, x, "latent")),
        "reconstruct": (["reconstruct", str(model), "-i", str(src)], ("reconstruct", {}, x, "mean")),
        "decode": (["decode", str(model), "-i", str(tmp_path / "z.npy")], ("decode", {}, z, "mean")),
        "sample": (["sample", str(model), "-n", str(N), "--seed", str(SEED)],
                   ("sample", {"seed": SEED}, np.empty((N, 0), np.float32), "mean")),
        "score": (["score", str(model), "-i", str(src), "--k", str(K), "--seed", str(SEED)],
                  ("score", {"k": K, "seed": SEED}, x, "nats")),
    }
    for name, (argv, (job, params, items, quantity)) in runs.items():
        out = tmp_path / f"{name}.npy"
        result = CliRunner().invoke(app, [*argv, "-o", str(out), *force])
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert f"path {engine.backend.name}/{precision}" in " ".join(result.output.split())
        want = jobs.make_job_fn(job, ref, params)(0, items)
        _check(np.load(out), want, precision, quantity, f"vae-engine {name}")
    if device == "cpu":
        result = CliRunner().invoke(app, ["detect", str(model), "-i", str(src), "-o", str(tmp_path / "f.npy"),
                                          "--scores", str(tmp_path / "s.npy"), *force[:4], "--threads", "2"])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("path", PATHS)
def test_server_endpoints(model, images, x, z, path):
    """Every endpoint, JSON and .npy bodies, on a server forced onto the path."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vae_engine.serving.server import create_app

    backend, precision, device = path
    _engine(model, path)
    ref = _reference(model)
    app = create_app(model, backend=backend, precision=precision, device=device, threads=2, max_batch=64,
                     max_wait_ms=0)

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    with TestClient(app) as client:
        info = client.get("/v1/info").json()
        assert info["path"].startswith(f"{backend}/{precision}")
        for op, field, items, params, quantity, want in (
            ("encode", "mu", x, {}, "latent", ref.encode(x)[0]),
            ("reconstruct", "items", x, {}, "mean", ref.reconstruct(x)),
            ("decode", "items", z, {}, "mean", ref.decode(z)),
            ("score", "scores", x, {"k": 1, "seed": SEED},  "nats",
             jobs.make_job_fn("score", ref, {"k": 1, "seed": SEED})(0, x)),
            ("score", "scores", x, {"k": K, "seed": SEED}, "nats",
             jobs.make_job_fn("score", ref, {"k": K, "seed": SEED})(0, x)),
        ):
            name = "z" if op == "decode" else "items"
            r = client.post(f"/v1/{op}", json={name: items.tolist(), **params})
            assert r.status_code == 200, r.text
            _check(np.asarray(r.json()[field]), want, precision, quantity, f"/v1/{op} JSON {params}")
            body = images if op != "decode" else z  # .npy: uint8 images as a user would send them
            r = client.post(f"/v1/{op}", content=npy(body), params=params,
                            headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
            assert r.status_code == 200, r.text
            _check(np.load(io.BytesIO(r.content)), want, precision, quantity, f"/v1/{op} .npy {params}")
        r = client.post("/v1/sample", json={"n": 5, "seed": SEED})
        assert r.status_code == 200, r.text
        _check(np.asarray(r.json()["items"]), jobs.make_job_fn("sample", ref, {"seed": SEED})(0, np.empty((5, 0))),
               precision, "mean", "/v1/sample")
        r = client.post("/v1/detect", json={"items": x.tolist()})
        assert r.status_code == 200, r.text
        assert len(r.json()["flags"]) == N


# ---- a Gaussian model of a real table: the other likelihood family, float inputs only ----


@pytest.fixture(scope="module")
def table_model(tmp_path_factory) -> tuple[Path, dict[str, Path], np.ndarray]:
    """A Gaussian VAE of scikit-learn's breast cancer table (30 features, real units), exported in fp32 and int8,
    and the table's first N rows in the float formats (read-only float32 .npy, float64 .npy, .npz, .csv, .parquet)."""
    from sklearn.datasets import load_breast_cancer

    from vae_engine.core.config import ModelConfig, TrainConfig
    from vae_engine.export.exporter import export
    from vae_engine.training.train import train

    folder = tmp_path_factory.mktemp("table")
    table = load_breast_cancer().data.astype(np.float32)
    np.save(folder / "train.npy", table)
    out = folder / "m"
    train(ModelConfig(latent_dim=4, hidden=(32,), likelihood="gaussian"),
          TrainConfig(data=str(folder / "train.npy"), epochs=5, batch_size=32, seed=1), out, plots=False)
    export(out, quantize="int8")  # fp16 graphs of raw-unit outputs in the thousands fail export's validation
    x = table[:N]
    kinds = {"float32.npy (read-only memory map)": folder / "f32.npy", "float64.npy": folder / "f64.npy",
             ".npz": folder / "t.npz", ".csv": folder / "t.csv"}
    np.save(kinds["float32.npy (read-only memory map)"], x)
    np.save(kinds["float64.npy"], x.astype(np.float64))
    np.savez(kinds[".npz"], x=x)
    np.savetxt(kinds[".csv"], x, fmt="%.9g", delimiter=",")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        kinds[".parquet"] = folder / "t.parquet"
        pq.write_table(pa.table({f"c{i}": x[:, i] for i in range(x.shape[1])}), kinds[".parquet"])
    except ImportError:
        pass
    return out, kinds, x


# The same differences for the Gaussian table model, where scores are in the table's raw units: a mean and a
# log-variance per feature, so rounding the log-variance costs more nats than rounding a logit, and "mean" is
# E[x|z] in raw units (some features are in the thousands). Measured maxima on an AMX Xeon (latent / mean / nats):
# fp32 4.8e-7 / 6.1e-5 / 1.8e-4; bf16 7.8e-3 / 2.4 / 2.1; int8 5.8e-3 / 0.73 / 0.76.
TABLE_TOLERANCE = {
    "fp32": {"latent": 1e-5, "mean": 2e-3, "nats": 5e-3},
    "fp16": {"latent": 2e-2, "mean": 2.0, "nats": 1.0},
    "bf16": {"latent": 0.1, "mean": 20.0, "nats": 8.0},
    "int8": {"latent": 0.1, "mean": 20.0, "nats": 8.0},
}


@pytest.mark.parametrize("path", PATHS)
def test_gaussian_table_model_on_every_float_kind(table_model, path, tmp_path, monkeypatch):
    model, table_kinds, x = table_model
    monkeypatch.setitem(TOLERANCE, path[1], TABLE_TOLERANCE[path[1]])
    _item_jobs_match(model, table_kinds, x, path, tmp_path)
