"""The engine and batch jobs: backend parity, determinism, streaming, bad inputs, interrupted jobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vae_engine import data, modeldir
from vae_engine.cli import app
from vae_engine.core import rng
from vae_engine.jobs import batch as jobs
from vae_engine.model.estimators import evaluate, reference_scores
from vae_engine.runtime.engine import Engine

from .conftest import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def model(exported_model):
    return exported_model


@pytest.fixture(scope="module")
def images(tiny_data):
    imgs, _ = data.load_split(tiny_data, "test")
    return imgs


def _x(images, n=20):
    return images[:n].reshape(n, -1).astype(np.float32) / 255.0


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backends_agree_with_torch_reference(model, images, backend):
    """Each engine backend against the PyTorch module itself (not through the engine)."""
    import torch

    from vae_engine import modeldir

    vae = modeldir.load_model(model)
    eng = Engine.load(model, backend=backend, threads=2)
    x = _x(images)
    with torch.no_grad():
        ref_mu, ref_logvar = vae.encode(torch.from_numpy(x))
        ref_p = torch.sigmoid(vae.decode(ref_mu)).numpy()
    for a, b in zip(eng.encode(x), (ref_mu.numpy(), ref_logvar.numpy()), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)  # fp32 graphs: summation order differs only
    np.testing.assert_allclose(eng.decode(ref_mu.numpy()), ref_p, atol=1e-5)


def test_int8_backend_close(model, images):
    x = _x(images)
    a = Engine.load(model, backend="onnxruntime", precision="int8", threads=2).reconstruct(x)
    b = Engine.load(model, backend="torch", threads=2).reconstruct(x)
    assert np.abs(a - b).mean() < 0.01  # int8 weights: small pixel-probability changes on average


def test_engine_scores_equal_pytorch_reference(model, images):
    """The ONNX Runtime + Numba path reproduces the PyTorch evaluation within 1e-3 nats, same eps."""
    torch_model = modeldir.load_model(model)
    eng = Engine.load(model, backend="onnxruntime", threads=2)
    ref = evaluate(lambda x, s, k, seed: reference_scores(torch_model, x, s, k, seed), images[:30], 64, 0)
    got = evaluate(eng.scores, images[:30], 64, 0)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-3)
    np.testing.assert_allclose(got[1], ref[1], atol=1e-3)


def test_sampling_deterministic_and_thread_independent(model):
    a = Engine.load(model, backend="onnxruntime", threads=1).sample(50, seed=4)
    b = Engine.load(model, backend="onnxruntime", threads=2).sample(50, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, Engine.load(model, backend="onnxruntime").sample(50, seed=5))
    eng = Engine.load(model, backend="torch", threads=2)
    mu, logvar = eng.encode(np.full((3, 784), 0.5, np.float32))
    z1 = eng.sample_posterior(mu, logvar, k=8, seed=1)
    assert z1.shape == (3, 8, eng.latent_dim)
    np.testing.assert_array_equal(z1, eng.sample_posterior(mu, logvar, k=8, seed=1))


def test_streamed_job_equals_one_shot(model, images, tmp_path):
    np.save(tmp_path / "x.npy", images[:50])
    eng = Engine.load(model, backend="onnxruntime", threads=2)
    for fn, shape in ((jobs.score_fn(eng, 16, 0, True), ()), (jobs.encode_fn(eng, True, True, 3), (2, eng.latent_dim))):
        src = jobs.open_items(tmp_path / "x.npy", eng.cfg)
        jobs.stream(src, fn, tmp_path / "small.npy", shape, batch_size=7)
        jobs.stream(src, fn, tmp_path / "big.npy", shape, batch_size=64)
        np.testing.assert_allclose(np.load(tmp_path / "small.npy"), np.load(tmp_path / "big.npy"), rtol=1e-6)


def test_interrupted_job_leaves_nothing(model, images, tmp_path):
    np.save(tmp_path / "x.npy", images[:50])
    eng = Engine.load(model, backend="onnxruntime", threads=2)
    recon = jobs.reconstruct_fn(eng)

    def interrupted(start, x):
        if start >= 20:
            raise KeyboardInterrupt
        return recon(start, x)

    with pytest.raises(KeyboardInterrupt):
        jobs.stream(jobs.open_items(tmp_path / "x.npy", eng.cfg), interrupted, tmp_path / "out.npy", (784,),
                    batch_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_jobs_end_to_end(model, images, tmp_path, tiny_data):
    np.save(tmp_path / "x.npy", images[:40])
    assert _cli("encode", model, "-i", tmp_path / "x.npy", "-o", tmp_path / "z.npy").exit_code == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (40, 4)
    assert _cli("decode", model, "-i", tmp_path / "z.npy", "-o", tmp_path / "d.png").exit_code == 0
    torch_fp32 = ("--backend", "torch", "--precision", "fp32")
    assert _cli("decode", model, "-i", tmp_path / "z.npy", "-o", tmp_path / "d.npy", "--binary",
                *torch_fp32).exit_code == 0
    assert set(np.unique(np.load(tmp_path / "d.npy")).tolist()) <= {0.0, 1.0}
    # --sample draws x ~ p(x|z) from the seed's per-item streams: for Bernoulli the same pixels as --binary
    assert _cli("decode", model, "-i", tmp_path / "z.npy", "-o", tmp_path / "s.npy", "--sample",
                *torch_fp32).exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.load(tmp_path / "d.npy"))
    eng = Engine.load(model, backend="torch", threads=1)
    probs = eng.decode(z)
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), rng.binarize_numpy(probs, 0, 0))
    for i in (1, 2):
        assert _cli("sample", model, "-n", 30, "--seed", 7, "-o", tmp_path / f"s{i}.npy").exit_code == 0
    assert (tmp_path / "s1.npy").read_bytes() == (tmp_path / "s2.npy").read_bytes()
    assert _cli("reconstruct", model, "-i", tmp_path / "x.npy", "-o", tmp_path / "r.png").exit_code == 0
    src = tiny_data / "t10k-images-idx3-ubyte.gz"  # IDX input
    assert _cli("score", model, "-i", src, "-o", tmp_path / "sc.npy", "--k", 8).exit_code == 0
    scores = np.load(tmp_path / "sc.npy")
    assert scores.ndim == 1 and np.all(np.isfinite(scores)) and np.all(scores > 0)


def test_cli_bad_inputs(model, tmp_path):
    out = tmp_path / "o.npy"
    cases = {
        "nan.npy": (np.full((4, 784), np.nan, np.float32), "NaN"),
        "range.npy": (np.full((4, 784), 3.0, np.float32), "[0, 1]"),
        "shape.npy": (np.zeros((4, 100), np.float32), "shape"),
        "empty.npy": (np.zeros((0, 784), np.uint8), "no items"),
        "dtype.npy": (np.zeros((4, 784), np.complex64), "dtype"),
    }
    for name, (arr, fragment) in cases.items():
        np.save(tmp_path / name, arr)
        one_line_error(_cli("encode", model, "-i", tmp_path / name, "-o", out), fragment)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    one_line_error(_cli("encode", model, "-i", tmp_path / "junk.npy", "-o", out), "not a readable .npy")
    np.save(tmp_path / "z.npy", np.zeros((3, 7), np.float32))
    one_line_error(_cli("decode", model, "-i", tmp_path / "z.npy", "-o", out), "(N, 4)")
    one_line_error(_cli("sample", tmp_path / "nomodel", "-o", out), "not found")
    one_line_error(_cli("sample", model, "-n", 5, "-o", tmp_path / "x.txt"), "must end in")
    one_line_error(_cli("encode", model, "-i", tmp_path / "missing.npy", "-o", out), "not found")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_thread_setting_does_not_leak_into_results(model):
    torch.set_num_threads(1)
    a = Engine.load(model, backend="torch", threads=1).sample(10, seed=1)
    b = Engine.load(model, backend="torch", threads=2).sample(10, seed=1)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("backend,precision", [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"),
                                               ("onnxruntime", "int8"), ("openvino", "fp32")])
def test_raw_call_is_the_same_computation(model, images, backend, precision):
    """bench's raw runtime call (backends.RAW_CALL) computes what the engine's call does, without its checks."""
    from vae_engine.runtime.backends import openvino_installed

    if backend == "openvino" and not openvino_installed():
        pytest.skip("OpenVINO not installed")
    engine = Engine.load(model, backend=backend, precision=precision, threads=1)
    x = _x(images, 3)
    z = np.random.default_rng(0).standard_normal((3, engine.latent_dim)).astype(np.float32)
    params = engine.decode(engine.encode(x)[0], params=True)
    want = {"encode": engine.encode(x)[0], "decode": engine.decode(z, params=True), "reconstruct": params}
    for op, expected in want.items():  # the same graph or module on the same input: int8 and bf16 round alike
        got = engine.backend.raw_call(op, z if op == "decode" else x)()
        got = got.float().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        if op == "reconstruct" and getattr(engine.backend, "ends_in_mean", {}).get("reconstruct"):
            expected = engine.likelihood.mean(params)  # the graph ends in the likelihood's mean
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=op)


@pytest.mark.parametrize("backend,precision", [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"),
                                               ("openvino", "fp32")])
def test_fused_reconstruct_equals_encode_then_decode(model, images, backend, precision):
    """A backend's one-call reconstruct (mu kept on the device or inside one graph) is the two-call path's answer."""
    from vae_engine.runtime.backends import openvino_installed

    if backend == "openvino" and not openvino_installed():
        pytest.skip("OpenVINO not installed")
    engine = Engine.load(model, backend=backend, precision=precision, threads=1)
    x = engine.prepare_items(_x(images, 5))
    fused = engine.backend.reconstruct(x)
    mu = engine.backend.encode(x)[0]
    two_calls = engine.likelihood.mean(engine.backend.decode(mu))
    np.testing.assert_allclose(fused, two_calls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(engine.decode(mu), two_calls, rtol=1e-5, atol=1e-6)  # ORT: the mean in the graph
    from vae_engine.runtime.backends.base import FUSED_MAX_ROWS

    many = engine.prepare_items(_x(np.concatenate([images] * 2), FUSED_MAX_ROWS + 6))  # encoder, then mean graph
    whole = engine.backend.reconstruct(many)
    np.testing.assert_allclose(whole[:5], fused, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole[-3:], engine.backend.reconstruct(many[-3:]), rtol=1e-5, atol=1e-6)
    mu, logvar = engine.backend.encode(x)  # one copy back for both: separate, contiguous, float32 arrays
    assert mu.flags.c_contiguous and logvar.flags.c_contiguous and mu.dtype == logvar.dtype == np.float32
    assert not np.shares_memory(mu, x)


@pytest.mark.parametrize("backend,precision", [("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                               ("openvino", "fp32")])
def test_chunked_calls_equal_one_call(model, images, backend, precision):
    """A call of more than `chunk_rows` rows runs chunk by chunk into one output (config.CHUNK_ROWS): the same
    numbers as one call, for every graph (two outputs for the encoder, the mean graphs), a short last chunk too."""
    from vae_engine.runtime.backends import openvino_installed

    if backend == "openvino" and not openvino_installed():
        pytest.skip("OpenVINO not installed")
    engine = Engine.load(model, backend=backend, precision=precision, threads=2)
    x = engine.prepare_items(_x(images, 23))
    z = np.random.default_rng(0).standard_normal((23, engine.latent_dim)).astype(np.float32)
    ops = {"encode": lambda: engine.backend.encode(x), "decode": lambda: [engine.backend.decode(z)],
           "decode, Fortran order": lambda: [engine.backend.decode(np.asfortranarray(z))],
           "E[x|z]": lambda: [engine.decode(z)], "reconstruct": lambda: [engine.reconstruct(x)]}
    for name, op in ops.items():
        engine.backend.chunk_rows = None
        whole = op()
        engine.backend.chunk_rows = 5  # chunks of 5, 5, 5, 5 and 3 rows
        chunked = op()
        for a, b in zip(chunked, whole, strict=True):
            assert a.shape == b.shape and a.dtype == np.float32 and a.flags.c_contiguous
            # the same graph per row; only the GEMM's row blocking may differ between batch sizes
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_an_empty_batch_gives_empty_answers(model, backend):
    """Zero items (an empty request, the empty tail of a split) are empty outputs of the right shapes, as
    `sample(0)` is, for every op and input kind; it used to fail inside NumPy's reshape."""
    engine = Engine.load(model, backend=backend, threads=1)
    d, latent = engine.cfg.input_dim, engine.latent_dim
    for x in (np.zeros((0, d), np.float32), np.zeros((0, d), np.uint8), np.zeros((0, 1, 28, 28), np.uint8)):
        mu, logvar = engine.encode(x)
        assert mu.shape == logvar.shape == (0, latent)
        assert engine.reconstruct(x).shape == (0, d)
        assert [a.shape for a in engine.scores(x, 0, 4, 0)] == [(0,), (0,)]
    z = np.zeros((0, latent), np.float32)
    assert engine.decode(z).shape == (0, d) and engine.sample(0).shape == (0, d)


@pytest.mark.slow  # ~35 s: every benchmarked path measured
def test_cli_bench_and_info(model, tmp_path):
    import json

    result = _cli("bench", model, "--quick", "--backends", "torch,ort-fp32,ort-int8", "--batches", "1,8",
                  "--ops", "decode", "--threads", 2, "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png",
                  "--markdown", tmp_path / "b.md")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["schema"] == "vae-engine-bench/2"
    assert all(report["gemm_peak_best_gflops"][p] > 0 for p in ("fp32", "bf16", "int8"))
    assert {(r["backend"], r["batch"]) for r in report["results"]} == {
        (b, n) for b in ("torch", "ort-fp32", "ort-int8") for n in (1, 8)}
    for r in report["results"]:
        assert r["p50_us"] <= r["p90_us"] <= r["p99_us"] and r["samples_per_s"] > 0
        # each row is held against the peak of its own precision; an int8 pair that keeps layers in fp32
        # against the rate of each layer at its own precision's peak (between the two peaks)
        best = report["gemm_peak_best_gflops"]
        if r["precision"] == "int8":
            lo, hi = sorted((best["fp32"], best["int8"]))
            assert lo - 1e-9 <= r["peak_gflops"] <= hi + 1e-9
        else:
            assert r["peak_gflops"] == best[r["precision"]]
        if r["batch"] == 1:  # the engine's overhead over the runtime alone, at batch 1 only
            assert r["raw_p50_us"] > 0 and r["overhead_us"] == pytest.approx(r["p50_us"] - r["raw_p50_us"])
        else:
            assert "raw_p50_us" not in r
    assert {r["backend"] for r in report["postprocess"]} == {"numba", "numpy", "torch", "numba-gaussian"}
    assert (tmp_path / "b.png").stat().st_size > 1000 and "| decode |" in (tmp_path / "b.md").read_text()
    assert "(+" in (tmp_path / "b.md").read_text() or "(-" in (tmp_path / "b.md").read_text()
    one_line_error(_cli("bench", model, "--backends", "tensorflow"), "unknown backend")
    info = _cli("info", model)
    assert info.exit_code == 0 and "decoder.int8.onnx" in info.output and "match" in info.output


def test_gemm_peaks_run_at_the_thread_count_asked_for(monkeypatch):
    """Every library's peak is measured with the threads asked for: NumPy's BLAS would otherwise take every core
    and the 'limit' of a 1-thread run would be a 2-thread rate."""
    from threadpoolctl import threadpool_info

    from vae_engine.perf import peaks

    seen = []

    def fake_rate(fn, flop, min_time):
        fn()
        blas = {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}
        seen.append((blas, torch.get_num_threads()))
        return 1.0

    monkeypatch.setattr(peaks, "best_rate", fake_rate)
    before = torch.get_num_threads()
    result = peaks.gemm_peak(1, n=64)
    assert set(result["fp32"]) == {"numpy", "torch", "onnxruntime"}
    numpy_fp32, _, torch_fp32, torch_bf16, _ = seen  # in gemm_peak's order; ORT sessions take threads themselves
    assert numpy_fp32[0] <= {1} and torch_fp32[1] == 1 and torch_bf16[1] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_warm_up_makes_before_the_first_request_what_is_made_on_first_use(model, images, backend):
    """`Engine.warm_up` (the server calls it at start-up) runs every op once: afterwards the fused ONNX Runtime
    graphs exist, and answers are the same as a cold engine's."""
    warm, cold = (Engine.load(model, backend=backend, threads=1) for _ in range(2))
    warm.warm_up()
    if backend == "onnxruntime":
        assert {"reconstruct", "decode-mean"} <= set(warm.backend.sessions)
    x = _x(images, 3)
    np.testing.assert_array_equal(warm.reconstruct(x), cold.reconstruct(x))
    np.testing.assert_array_equal(warm.log_likelihood(x, k=4), cold.log_likelihood(x, k=4))


def test_bench_names_the_row_auto_takes():
    """A tuning decision maps to its bench row's label, and tables mark that row (and say what the mark means)."""
    from vae_engine.runtime import bench

    assert bench.auto_label({"backend": "onnxruntime", "precision": "int8"}) == "ort-int8"
    assert bench.auto_label({"backend": "openvino", "precision": "bf16"}) == "ov-bf16"
    assert bench.auto_label({"backend": "torch", "precision": "fp32"}) == "torch"
    row = {"op": "decode", "batch": 8, "p50_us": 10.0, "p90_us": 11.0, "p99_us": 12.0, "samples_per_s": 8e5,
           "gflops": 1.0, "fraction_of_peak": 0.5, "speedup_vs_torch": 1.0}
    report = {"results": [{**row, "backend": "torch", "auto": False}, {**row, "backend": "ort-fp32", "auto": True}],
              "gemm_peak_gflops": {"fp32": {"numpy": 100.0}}, "auto": {"8": {"label": "ort-fp32"}},
              "postprocess": [{"backend": "numba", "p50_us": 1.0, "max_rel_err_vs_numpy": 0.0}],
              "machine": {"cpu": "Some CPU", "cores": 2, "flags": ["avx2"], "threads": 2},
              "versions": {"python": "3.11.7", "onnxruntime": "1.32.0"}, "date": "2026-12-07",
              "command": "vae-engine bench m"}
    table = bench.markdown(report, batches=(8,))
    assert "| ort-fp32* |" in table and "| torch |" in table and bench.AUTO_MARK in table
    assert table.startswith("Machine: Some CPU, 2 cores, flags avx2; 2 threads; Python 3.11.7; onnxruntime 1.32.0; "
                            "2026-12-07; `vae-engine bench m`.")


@pytest.mark.slow  # ~30 s: GEMM peaks, two paths timed, and the auto decision measured
def test_bench_marks_what_auto_takes_at_each_batch(model):
    from vae_engine.runtime import bench

    report = bench.benchmark(model, ("torch", "ort-fp32"), (2,), ("decode",), threads=1)
    decision = report["auto"]["2"]
    assert decision["path"].startswith(("torch/fp32", "onnxruntime/fp32", "openvino/fp32"))
    marked = [r["backend"] for r in report["results"] if r["auto"]]
    assert marked == ([decision["label"]] if decision["label"] in ("torch", "ort-fp32") else [])


def test_openvino_is_imported_without_its_conversion_tools():
    """The OpenVINO path imports the runtime, not `openvino.tools.ovc` (model conversion and its telemetry: most of
    `import openvino`'s time); `openvino.convert_model` still works for code that uses it afterwards."""
    import subprocess
    import sys

    pytest.importorskip("openvino")
    code = ("import sys; from vae_engine.runtime.backends.ovlib import ov; ov.Core(); "
            "print('openvino.tools.ovc' in sys.modules, 'urllib.request' in sys.modules); "
            "print(callable(ov.convert_model), 'openvino.tools.ovc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True", "True"]
