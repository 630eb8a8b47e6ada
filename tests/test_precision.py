"""Precisions and backends (fp32, bf16, int8; torch, ONNX Runtime, OpenVINO; GPU paths where a GPU exists) and
`--precision auto`: only paths within the budget are picked, the decision is saved, reused, and invalidated when
the machine or library versions change. No timing is asserted: which path is fastest is the machine's business."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vae_engine import data, modeldir
from vae_engine.cli import app
from vae_engine.core import hardware
from vae_engine.core.errors import VaeEngineError
from vae_engine.runtime import tuning
from vae_engine.runtime.engine import Engine

from .conftest import one_line_error

runner = CliRunner()
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture()
def model(exported_model, tmp_path):
    """A private copy (tuning.json is written into the model folder)."""
    out = tmp_path / "m"
    # none of the other tests' decisions or accuracies
    shutil.copytree(exported_model, out, ignore=shutil.ignore_patterns(tuning.TUNING, tuning.ACCURACY))
    return out


@pytest.fixture(scope="module")
def x(tiny_data):
    images, _ = data.load_split(tiny_data, "test")
    return images[:16].reshape(16, -1).astype(np.float32) / 255.0


def _reference(model_dir, x):
    vae = modeldir.load_model(model_dir)
    with torch.no_grad():
        mu, logvar = vae.encode(torch.from_numpy(x))
        return mu.numpy(), logvar.numpy(), vae.decode(mu).numpy()


# tolerances: fp32 paths differ only in summation order; bf16 keeps 8 bits of mantissa (relative error ~2^-8 per
# operation, a few layers deep), so logits of size ~10 move by up to a few tenths
TOLERANCE = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.05}
PATHS = [("torch", "fp32", "cpu"), ("onnxruntime", "fp32", "cpu"), ("torch", "bf16", "cpu"),
         pytest.param("openvino", "fp32", "cpu", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="no openvino")),
         pytest.param("openvino", "bf16", "cpu", marks=pytest.mark.skipif(
             not (HAS_OPENVINO and hardware.native_bf16()), reason="needs openvino and a CPU with native bf16")),
         *[pytest.param(b, p, "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"))
           for b, p in (("torch", "fp32"), ("torch", "bf16"), ("torch", "fp16"))]]


@pytest.mark.parametrize(("backend", "precision", "device"), PATHS)
def test_paths_agree_with_the_fp32_reference(exported_model, x, backend, precision, device):
    eng = Engine.load(exported_model, backend=backend, precision=precision, device=device, threads=2)
    assert (eng.backend.name, eng.backend.precision) == (backend, precision)
    mu, logvar, logits = _reference(exported_model, x)
    tol = TOLERANCE[precision]
    got_mu, got_logvar = eng.encode(x)
    assert got_mu.dtype == np.float32 and got_mu.shape == mu.shape
    np.testing.assert_allclose(got_mu, mu, atol=tol, rtol=tol)
    np.testing.assert_allclose(got_logvar, logvar, atol=tol, rtol=tol)
    np.testing.assert_allclose(eng.decode(mu, params=True), logits, atol=tol * 10, rtol=tol)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_onnxruntime_cuda_runs_or_says_why(exported_model, x):
    import onnxruntime

    eng = Engine.load(exported_model, backend="onnxruntime", device="cuda", threads=2)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert eng.backend.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    mu, _, _ = _reference(exported_model, x)
    np.testing.assert_allclose(eng.encode(x)[0], mu, atol=1e-3)


def test_unsupported_combinations_are_clear_errors(exported_model):
    with pytest.raises(VaeEngineError, match="no bf16 kernels"):
        Engine.load(exported_model, backend="onnxruntime", precision="bf16")
    with pytest.raises(VaeEngineError, match="int8 is --backend onnxruntime's"):
        Engine.load(exported_model, backend="torch", precision="int8")
    with pytest.raises(VaeEngineError, match="unknown precision"):
        Engine.load(exported_model, precision="fp8")
    if HAS_OPENVINO and not hardware.native_bf16():
        with pytest.raises(VaeEngineError, match="no native bf16"):
            Engine.load(exported_model, backend="openvino", precision="bf16")


def _no_vnni(monkeypatch, flags=("avx2", "fma")):
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("Test CPU", frozenset(flags)))


def test_candidates_follow_the_cpu(model, monkeypatch):
    _no_vnni(monkeypatch)
    paths, notes = tuning.candidates(model)
    assert ("onnxruntime", "int8") in paths  # int8 is timed wherever it is exported; its accuracy decides
    assert ("torch", "fp32") not in paths and any(n.startswith("torch/fp32: not timed") for n in notes)
    assert not any(p == "bf16" for _, p in paths) and any("bf16" in n for n in notes)
    assert ("onnxruntime", "int8") not in tuning.candidates(model, int8=False)[0]
    _no_vnni(monkeypatch, ("avx2", "avx512f", "avx512_vnni", "avx512_bf16"))
    paths, _ = tuning.candidates(model)
    assert ("onnxruntime", "int8") in paths and any(p == "bf16" for _, p in paths)
    assert tuning.candidates(model, backend="onnxruntime")[0] == [("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    assert tuning.candidates(model, backend="torch")[0] == [("torch", "fp32")]  # asked for: run as asked


def test_auto_picks_only_paths_within_the_budget(model):
    # a budget int8 cannot meet: whatever its speed, it is not even timed, and a note says why
    d = tuning.choose(Engine.load, model, threads=2, batch=64, budget=1e-7)
    rows = {(r["backend"], r["precision"]): r for r in d["measurements"]}
    assert ("onnxruntime", "int8") not in rows and abs(d["accuracy"]["onnxruntime/int8"]["nll_change_nats"]) > 1e-7
    assert any(n.startswith("onnxruntime/int8: mean NLL change") for n in d["notes"])
    assert d["precision"] == "fp32" and all(tuning.within(r, 1e-7) for r in rows.values())


def test_reference_without_torch_agrees_with_torch(model):
    """Accuracy is measured against ONNX Runtime's fp32 graphs where exported (no torch needed): they agree with
    the PyTorch reference to float rounding, far below any budget."""
    assert tuning.reference_path(model) == ("onnxruntime", "fp32")
    ref = tuning.reference(Engine.load, model, 2, "onnxruntime")
    change = tuning.accuracy(Engine.load(model, backend="torch", threads=2), ref)
    assert abs(change["nll_change_nats"]) < 1e-3 and abs(change["nelbo_change_nats"]) < 1e-3


QUICK = 0.02  # seconds of timing rounds: these tests check when a decision is kept, not which path wins


def test_decision_is_saved_reused_and_invalidated(model, monkeypatch):
    first = tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK)
    assert not first["reused"] and first["saved"] and (model / tuning.TUNING).is_file()
    again, checks = tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK), 0
    while not again["reused"]:  # an unclear ranking is raced again by later jobs (until clear), then kept
        assert not first["clear"] and again["checks"] == checks + 1 <= tuning.RECHECKS
        checks, again = again["checks"], tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK)
    assert again["reused"]
    # another batch size is another decision; both are kept
    tuning.choose(Engine.load, model, threads=2, batch=8, seconds=QUICK)
    assert len(tuning.saved(model)) == 2
    # new CPU flags or new library versions: measured again, not reused
    _no_vnni(monkeypatch, ("avx2", "avx512_vnni"))
    assert not tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK)["reused"]
    monkeypatch.undo()
    real = modeldir.versions()
    monkeypatch.setattr(modeldir, "versions", lambda: {**real, "onnxruntime": "99.0"})
    assert not tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK)["reused"]
    # a replaced graph file (re-export, or someone else's file): measured again, and a bad graph is an error
    monkeypatch.undo()
    import onnx

    graph = onnx.load(model / "decoder.int8.onnx")
    onnx.helper.set_metadata_props(graph, {"note": "re-exported"})
    onnx.save(graph, model / "decoder.int8.onnx")
    assert not tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK)["reused"]
    # retrained weights: the old decision does not apply
    monkeypatch.setattr(modeldir, "weights_sha256", lambda d: "0" * 64)
    assert not tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK)["reused"]


def test_accuracy_is_measured_once_per_model_and_cpu_class(model, monkeypatch):
    scored = []
    real = tuning.accuracy
    monkeypatch.setattr(tuning, "accuracy", lambda engine, ref: scored.append(engine.path) or real(engine, ref))
    tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)
    n = len(scored)
    assert n >= 1 and (model / tuning.ACCURACY).is_file()  # int8 (and bf16 where native) measured
    tuning.choose(Engine.load, model, threads=2, batch=64, seconds=QUICK, retune=True)  # another decision
    assert len(scored) == n  # ... but the same accuracy
    _no_vnni(monkeypatch)  # int8 without VNNI is other arithmetic: measured for that class
    tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)
    assert len(scored) == n + 1 and "onnxruntime/int8" in scored[-1]
    keys = [e["key"]["numerics"] for e in json.loads((model / tuning.ACCURACY).read_text())["paths"]]
    assert "int8-no-vnni" in keys


def test_read_only_model_folder_saves_decisions_in_the_user_cache(model, monkeypatch, tmp_path):
    from vae_engine.core import atomic

    monkeypatch.setenv("VAE_ENGINE_CACHE", str(tmp_path / "cache"))
    real = atomic.write_json

    def read_only(path, obj):  # the model folder cannot be written (root ignores chmod, so refuse here)
        if path.parent == model:
            raise VaeEngineError(f"{path}: read-only file system")
        real(path, obj)

    monkeypatch.setattr(atomic, "write_json", read_only)
    first = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK, retune=True)
    assert first["saved"] and str(tmp_path / "cache") in first["saved_to"]
    assert not (model / tuning.TUNING).exists() and not (model / tuning.ACCURACY).exists()
    for _ in range(tuning.RECHECKS + 1):
        again = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)
    assert again["reused"] and (again["backend"], again["precision"]) in {
        (r["backend"], r["precision"]) for r in first["measurements"]}


def test_race_finds_the_clearly_faster_function_and_says_when_it_cannot():
    import time

    times, clear = tuning.race({"fast": lambda: None, "slow": lambda: time.sleep(0.001)}, seconds=1.0)
    assert clear and np.median(times["fast"]) < np.median(times["slow"])
    assert len(times["fast"]) == len(times["slow"]) >= tuning.MIN_ROUNDS  # interleaved: as many rounds each
    spin = lambda: sum(range(2000))  # noqa: E731
    times, _ = tuning.race({"a": spin, "b": spin}, seconds=0.05)
    assert len(times["a"]) >= tuning.MIN_ROUNDS  # equal functions: stops at the time limit, whatever it decided


def test_slow_rows_are_raced_briefly_at_a_batch_that_fits():
    """A round longer than the race's whole budget: JOB_MIN_ROUNDS rounds, not MIN_ROUNDS. A row slower than
    SLOW_ROW (an imported image autoencoder's seconds): timed at as many rows as fit a quarter of the budget; a
    small model's batch is never changed (its batch-1 call is mostly fixed cost)."""
    import time
    from types import SimpleNamespace

    nap = lambda: time.sleep(0.03)  # noqa: E731
    times, _ = tuning.race({"a": nap, "b": nap}, seconds=0.01)
    assert len(times["a"]) == tuning.JOB_MIN_ROUNDS

    def engine(per_row: float):
        backend = SimpleNamespace(encode=lambda x: time.sleep(per_row * len(x)), decode=lambda z: None)
        return SimpleNamespace(backend=backend, cfg=SimpleNamespace(input_dim=4, latent_dim=2))

    assert tuning._timed_batch(engine(0.04), 256, 0.6) == 3  # 0.15 s of a 0.6 s race: 3 rows of 0.04 s
    assert tuning._timed_batch(engine(0.5), 256, 0.6) == 1
    assert tuning._timed_batch(engine(0.0), 4096, 0.6) == 4096


def test_a_short_jobs_race_is_as_long_as_the_job():
    """job_calls: equal functions (no clear winner) stop after JOB_MIN_ROUNDS rounds once the race has run as
    long as the job would, not at the time limit; a long job races on to MIN_ROUNDS and beyond."""
    spin = lambda: sum(range(2000))  # noqa: E731
    times, _ = tuning.race({"a": spin, "b": spin}, seconds=30.0, job_calls=0.5)
    assert len(times["a"]) == tuning.JOB_MIN_ROUNDS
    times, _ = tuning.race({"a": spin, "b": spin}, seconds=0.05, job_calls=1e9)
    assert len(times["a"]) >= tuning.MIN_ROUNDS


def test_unclear_decisions_are_rechecked_by_jobs_that_can_afford_it(model, monkeypatch):
    """A decision whose ranking was unclear is raced again by a server (items None) or a job at least as long as
    the race costs (importing and opening every path), never by a short job, which reuses it."""
    calls = []
    real = tuning.time_paths

    def unclear(*args, **kwargs):
        rows, _ = real(*args, **kwargs)
        calls.append(1)
        return [{**r, "open_s": 0.1} for r in rows], False

    monkeypatch.setattr(tuning, "time_paths", unclear)
    first = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK, retune=True)
    rate = max(r["items_per_s"] for r in first["measurements"])
    cost = sum(first["import_s"].values()) + 0.1 * len(first["measurements"])
    assert not tuning.affords_recheck(first, int(rate * cost * 0.5))
    assert tuning.affords_recheck(first, int(rate * cost * 2) + 1) and tuning.affords_recheck(first, None)
    short = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK, items=int(rate * cost * 0.5))
    assert short["reused"] and len(calls) == 1
    server = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)
    assert not server["reused"] and server["checks"] == 1 and len(calls) == 2


def test_a_job_too_short_to_measure_paths_for_runs_the_first_candidate(model, monkeypatch):
    """A job with no saved decision times the first candidate on one call: under DECIDE_SECONDS of work it runs
    that path and saves nothing (the decision is left to a longer job, or `tune`); a longer job measures and saves
    the decision, which later short jobs reuse."""
    paths = tuning.candidates(model)[0]
    short = tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK, items=8)
    assert "short_job" in short and not short["saved"] and (short["backend"], short["precision"]) == paths[0]
    assert not (model / tuning.TUNING).exists()
    assert "not worth measuring every path" in tuning.describe_path(short["backend"], short["precision"], short)
    monkeypatch.setattr(tuning, "DECIDE_SECONDS", 0.0)  # every job is long enough
    long = tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK, items=8)
    assert "short_job" not in long and long["saved"] and len(long["measurements"]) > 1
    monkeypatch.setattr(tuning, "DECIDE_SECONDS", 1e9)
    assert tuning.choose(Engine.load, model, threads=2, batch=32, seconds=QUICK, items=8)["reused"]
    eng = Engine.load(model, precision="auto", threads=2, batch_size=32, items=8)
    assert eng.decision["reused"]


def test_damaged_or_read_only_tuning_file_is_not_fatal(model):
    (model / tuning.TUNING).write_text("{not json")
    d = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)
    assert not d["reused"] and json.loads((model / tuning.TUNING).read_text())["schema"] == tuning.SCHEMA
    (model / tuning.TUNING).write_text(json.dumps({"schema": tuning.SCHEMA, "decisions": [{"key": 3}, "x"]}))
    assert not tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)["reused"]
    (model / tuning.ACCURACY).write_text("[1, 2")
    assert not tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK, retune=True)["reused"]


def test_engine_auto_reports_its_path(model, x):
    eng = Engine.load(model, precision="auto", threads=2, batch_size=16, max_nll_change=0.0)
    assert eng.decision is not None and eng.backend.precision == "fp32"
    assert eng.path.startswith(f"{eng.backend.name}/fp32 (auto")
    ref = Engine.load(model, backend="torch", threads=2)
    np.testing.assert_allclose(eng.log_likelihood(x, k=8), ref.log_likelihood(x, k=8), atol=1e-3)


def test_cli_precision(model, x, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "DECIDE_SECONDS", 0.0)  # a job of 16 items decides too (see the short-job test)
    np.save(tmp_path / "x.npy", (x * 255).astype(np.uint8))
    out = tmp_path / "s.npy"
    r = runner.invoke(app, ["score", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(out), "--k", "4",
                            "--max-nll-change", "0", "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert "/fp32 (auto: fastest within 0.0 nats" in " ".join(r.output.split())
    fixed = tmp_path / "f.npy"
    r = runner.invoke(app, ["score", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(fixed), "--k", "4",
                            "--precision", "fp32", "--backend", "torch", "--threads", "2"])
    assert r.exit_code == 0 and "torch/fp32" in r.output
    np.testing.assert_allclose(np.load(out), np.load(fixed), atol=1e-3)
    info = runner.invoke(app, ["info", str(model)])
    assert info.exit_code == 0 and "--precision auto on this CPU" in " ".join(info.output.split())
    one_line_error(runner.invoke(app, ["score", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(out),
                                  "--precision", "fp8"]), "unknown precision")
    one_line_error(runner.invoke(app, ["score", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(out),
                                  "--max-nll-change", "-1"]), "--max-nll-change")
    np.save(tmp_path / "z.npy", np.zeros((3, 4), np.float32))
    one_line_error(runner.invoke(app, ["decode", str(model), "-i", str(tmp_path / "z.npy"), "-o", str(out),
                                  "--backend", "onnxruntime", "--precision", "bf16"]), "no bf16 kernels")
    # a bad input is found before any path is loaded or measured
    one_line_error(runner.invoke(app, ["decode", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(out)]),
                   "must be float of shape (N, 4)")


def test_device_resident_log_weights_equal_the_numba_path(exported_model, x):
    """The GPU scoring path (log-weights next to the decoder, `TorchBackend.log_weights`) run on the CPU here:
    the same IWAE estimates as the Numba kernels, for the same eps streams."""
    eng = Engine.load(exported_model, backend="torch", threads=2)
    numba_path = eng.log_likelihood(x, k=50, seed=3)
    eng.backend.score_rows = 256  # force the device-resident path, in blocks (k=50 spans several)
    np.testing.assert_allclose(eng.log_likelihood(x, k=50, seed=3), numba_path, rtol=1e-5)  # fp32 sums of 784 terms


def test_fractions_of_a_peak_keep_small_values():
    """A small model on a GPU runs at a fraction of a percent of its peak: shown, not rounded to 0."""
    from vae_engine.perf.fraction import fraction_of, percent

    assert fraction_of(2065.3, 778550.4) == 0.00265 and fraction_of(1.0, None) is None
    assert [percent(f) for f in (0.00265, 0.0003, 0.523, 1.06, None)] == ["0.27%", "0.03%", "52%", "106%", "-"]
    assert percent(0.00265, sign=False) == "0.27"


def test_a_job_takes_the_path_that_finishes_it_soonest():
    """With its size known, a job weighs each path's start-up (its runtime's import, the slowest opening of that
    runtime) against its rate: a short job takes the path that starts fastest, a long one the fastest path."""
    rows = [{"backend": "onnxruntime", "precision": "fp32", "threads": 2, "items_per_s": 100e3, "open_s": 0.04},
            {"backend": "onnxruntime", "precision": "int8", "threads": 2, "items_per_s": 150e3, "open_s": 0.01},
            {"backend": "openvino", "precision": "bf16", "threads": 2, "items_per_s": 300e3, "open_s": 0.1}]
    d = {"measurements": rows, "import_s": {"onnxruntime": 0.1, "openvino": 0.3}}
    assert tuning.for_items(d, 10)["precision"] == "int8"  # same start-up as fp32 (slowest opening), faster
    assert tuning.for_items(d, 10_000)["backend"] == "onnxruntime"  # 0.14 + 0.07 s against 0.4 + 0.03 s
    assert tuning.for_items(d, 10_000_000)["backend"] == "openvino"  # the rate decides
    assert tuning.for_items({"measurements": rows}, 10)["backend"] == "onnxruntime"  # no import costs recorded


def test_engine_load_with_a_job_size_names_its_choice(model):
    big = Engine.load(model, precision="auto", threads=2, batch_size=64, items=10**9)
    assert "soonest done for 1,000,000,000 items" in big.path
    row = tuning.for_items(big.decision, 10**9)
    assert (big.backend.name, big.backend.precision) == (row["backend"], row["precision"])


def test_damaged_or_crafted_decisions_are_measured_again(model):
    """A saved decision whose path or numbers are not valid (a damaged or crafted tuning.json with a matching key)
    is ignored: the job measures again instead of acting on it or failing."""
    first = tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)
    doc = json.loads((model / tuning.TUNING).read_text())
    for damage in ({"precision": "fp8"}, {"threads": "two"}, {"measurements": [{"backend": "x"}]},
                   {"measurements": [{**first["measurements"][0], "items_per_s": "fast"}]},
                   {"import_s": {"onnxruntime": -1}}, {"measurements": []}):
        bad = {**doc, "decisions": [{**doc["decisions"][0], **damage, "clear": True}]}
        (model / tuning.TUNING).write_text(json.dumps(bad))
        assert not tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK)["reused"]
    (model / tuning.ACCURACY).write_text(json.dumps({"schema": tuning.ACCURACY_SCHEMA, "paths": [
        {"key": {}, "nll_change_nats": "zero"}]}))
    assert tuning.choose(Engine.load, model, threads=2, batch=16, seconds=QUICK, retune=True)["backend"]


def test_cli_tune_measures_again_and_saves(model):
    r = runner.invoke(app, ["tune", str(model), "--batch-size", "1,16", "--threads", "2", "--seconds", "0.05"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "batch 1:" in text and "batch 16:" in text and f"saved to {model / tuning.TUNING}" in text
    assert {d["key"]["batch"] for d in tuning.saved(model)} == {1, 16}
    one_line_error(runner.invoke(app, ["tune", str(model), "--batch-size", "x"]), "comma-separated integers")
    one_line_error(runner.invoke(app, ["tune", str(model), "--seconds", "0"]), "--seconds")


def test_one_accuracy_rule_with_its_standard_error():
    """`--precision auto` and `export --quantize int8` judge a path the same way: |mean NLL change| + 2 standard
    errors within the budget (a mean inside it by less than its noise does not pass)."""
    from vae_engine.core.config import CONFIDENCE_SE, DEFAULT_BUDGET, within_budget

    assert within_budget(0.004, 0.002, DEFAULT_BUDGET) and not within_budget(0.008, 0.002, DEFAULT_BUDGET)
    row = {"precision": "int8", "nll_change_nats": -0.006, "nll_change_se_nats": 0.003}
    assert tuning.within(row, 0.006 + CONFIDENCE_SE * 0.003) and not tuning.within(row, 0.0119)
    assert tuning.within({**row, "precision": "fp32"}, 0.0)


def test_jobs_take_every_device_engine_load_takes(model, x, tmp_path):
    np.save(tmp_path / "x.npy", (x * 255).astype(np.uint8))
    args = ["encode", str(model), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "z.npy"), "--precision",
            "fp32", "--threads", "2"]
    if not HAS_CUDA:  # auto is the CPU here; a GPU asked for and missing is one clear line
        assert runner.invoke(app, [*args, "--device", "auto"]).exit_code == 0
        one_line_error(runner.invoke(app, [*args, "--device", "cuda:1"]), "no CUDA GPU")
    one_line_error(runner.invoke(app, [*args, "--device", "tpu"]), "unknown device 'tpu'")
