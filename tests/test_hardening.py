"""Hostile inputs and faults, one test per class: each builds its hostile file or fault itself.

The contract: an error a user can cause is one `error:` line, exit code 2, no traceback, nothing half-written;
an interrupted run can be resumed or restarted.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vae_engine import data, modeldir
from vae_engine.cli import app
from vae_engine.core import atomic
from vae_engine.core.config import ModelConfig, TrainConfig
from vae_engine.core.errors import DataError, ModelDirError, VaeEngineError
from vae_engine.modeldir import graphs
from vae_engine.runtime.engine import Engine
from vae_engine.training.train import train

from .conftest import idx_bytes, one_line_error

runner = CliRunner()
MODEL = ModelConfig(latent_dim=4, hidden=(32,))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plots"))
    return dst


def _cfg(tiny_data, **kw) -> TrainConfig:
    return TrainConfig(**{"dataset": "dir", "data_dir": str(tiny_data), "batch_size": 32, "seed": 3, **kw})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if atomic.TMP_TAG in p.name or p.name == modeldir.LOCK)


# ---- 1. ONNX: external data anywhere, foreign operator domains ----


def _external(name: str) -> TensorProto:
    t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../../../etc/passwd")
    return t


def _with_if_branch(decoder: onnx.ModelProto, branch_tensor: str) -> onnx.ModelProto:
    """The decoder with an If node whose branches hide external data (as an initializer, a sparse
    initializer or a Constant attribute), its output unused."""
    model = onnx.ModelProto.FromString(decoder.SerializeToString())
    out = helper.make_tensor_value_info("leak", TensorProto.FLOAT, [1])
    identity = helper.make_node("Identity", ["ext"], ["leak"])
    if branch_tensor == "initializer":
        branch = helper.make_graph([identity], "then", [], [out], [_external("ext")])
    elif branch_tensor == "sparse":
        sparse = helper.make_sparse_tensor(_external("ext"), helper.make_tensor("i", TensorProto.INT64, [1], [0]), [1])
        branch = helper.make_graph([identity], "then", [], [out])
        branch.sparse_initializer.append(sparse)
    else:  # a Constant node's tensor attribute
        constant = helper.make_node("Constant", [], ["leak"], value=_external("c"))
        branch = helper.make_graph([constant], "then", [], [out])
    cond = numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["cond"], ["leak_out"], then_branch=branch, else_branch=branch))
    return model


@pytest.mark.parametrize("where", ["initializer", "sparse", "attribute"])
def test_external_data_in_subgraphs_is_refused(exported_model, tmp_path, where):
    dst = copy_model(exported_model, tmp_path / "m")
    path = graphs.graph_path(dst, "decoder")
    onnx.save(_with_if_branch(onnx.load(path), where), path)
    with pytest.raises(ModelDirError, match="external data"):
        graphs.load_graph(path, "decoder", modeldir.model_config(dst))
    np.save(tmp_path / "z.npy", np.zeros((3, 4), np.float32))
    one_line_error(invoke("decode", dst, "-i", tmp_path / "z.npy", "-o", tmp_path / "x.npy"), "external data")
    assert not (tmp_path / "x.npy").exists()


def test_foreign_operator_domain_is_refused(exported_model, tmp_path):
    dst = copy_model(exported_model, tmp_path / "m")
    path = graphs.graph_path(dst, "decoder")
    model = onnx.load(path)
    node = model.graph.node[-1]
    node.domain = "evil.custom"
    model.opset_import.add(domain="evil.custom", version=1)
    onnx.save(model, path)
    np.save(tmp_path / "z.npy", np.zeros((3, 4), np.float32))
    one_line_error(invoke("decode", dst, "-i", tmp_path / "z.npy", "-o", tmp_path / "x.npy"), "evil.custom")


def test_graph_returning_wrong_shape_is_refused(exported_model, tmp_path):
    """A graph whose declared outputs are right but whose real outputs are not must not reach the kernels."""
    dst = copy_model(exported_model, tmp_path / "m")
    path = graphs.graph_path(dst, "decoder")
    model = onnx.load(path)
    last = model.graph.node[-1]
    real = last.output[0]
    last.output[0] = real + "_full"
    starts, ends = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "s0"), (7, "s1")))
    axes = numpy_helper.from_array(np.array([1], np.int64), "ax")
    model.graph.initializer.extend([starts, ends, axes])
    model.graph.node.append(helper.make_node("Slice", [real + "_full", "s0", "s1", "ax"], [real]))
    onnx.save(model, path)
    engine = Engine.load(dst, backend="onnxruntime")
    with pytest.raises(ModelDirError, match="returned float32 \\(2, 7\\)"):
        engine.decode(np.zeros((2, 4), np.float32))
    engine.backend.chunk_rows = 1  # a call in chunks: its first chunk is checked the same way
    with pytest.raises(ModelDirError, match="returned float32 \\(1, 7\\)"):
        engine.decode(np.zeros((3, 4), np.float32))


# ---- 2. every loaded tensor is checked: weights and optimizer state ----


def test_wrong_shape_optimizer_state_is_refused(tiny_data, tmp_path):
    out = tmp_path / "m"
    train(MODEL, _cfg(tiny_data, epochs=1), out, plots=False)
    path = out / modeldir.STATE
    tensors = load_file(str(path))
    tensors["optim.0.exp_avg"] = torch.zeros(7)  # 7 values for a (32, 784) parameter: an out-of-bounds write
    save_file(tensors, str(path), metadata={"epoch": "1"})
    with pytest.raises(ModelDirError, match=r"optim.0.exp_avg is float32 \(7,\), config.json needs float32"):
        train(None, _cfg(tiny_data, epochs=2), out, resume=True, plots=False)
    tensors["optim.0.exp_avg"] = torch.zeros(32, 784, dtype=torch.float64)
    save_file(tensors, str(path), metadata={"epoch": "1"})
    one_line_error(invoke("train", "--out", out, "--epochs", 2, "--resume", "--data-dir", tiny_data), "float64")


@pytest.mark.parametrize("damage", ["nan", "shape", "extra", "missing"])
def test_damaged_weights_are_refused(tiny_model, tmp_path, damage):
    dst = copy_model(tiny_model, tmp_path / "m")
    path = dst / modeldir.WEIGHTS
    tensors = load_file(str(path))
    name = next(iter(tensors))
    if damage == "nan":
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    elif damage == "shape":
        tensors[name] = torch.zeros(3)
    elif damage == "extra":
        tensors["evil"] = torch.zeros(1)
    else:
        del tensors[name]
    save_file(tensors, str(path))
    with pytest.raises(ModelDirError, match=str(path)):
        modeldir.load_model(dst)
    one_line_error(invoke("sample", dst, "--backend", "torch", "-n", 2, "-o", tmp_path / "s.npy"), str(path))


# ---- 3. interrupted folders are resumable or restartable ----


def test_folder_without_checkpoint_restarts(tiny_data, tmp_path):
    out = tmp_path / "m"
    train(MODEL, _cfg(tiny_data, epochs=1), out, plots=False)
    for name in (modeldir.STATE, modeldir.WEIGHTS, modeldir.METRICS):  # as if killed in epoch 1
        (out / name).unlink()
    rows = train(None, _cfg(tiny_data, epochs=2), out, resume=True, plots=False)
    assert [r["epoch"] for r in rows] == [1, 2]
    for name in (modeldir.STATE, modeldir.WEIGHTS, modeldir.METRICS):
        (out / name).unlink()
    assert [r["epoch"] for r in train(MODEL, _cfg(tiny_data, epochs=1), out, plots=False)] == [1]  # fresh run


def test_diverged_run_leaves_a_restartable_folder(tiny_data, tmp_path):
    out = tmp_path / "m"
    line = one_line_error(invoke("train", "--out", out, "--data-dir", tiny_data, "--lr", 1e38, "--epochs", 2,
                                 "--batch-size", 32, "--hidden", 32, "--latent-dim", 4), "diverged")
    assert "lower --lr" in line
    assert not out.exists()  # a fresh folder with nothing worth keeping is removed
    one_line_error(invoke("train", "--out", out, "--lr", "inf"), "learning rate")
    result = invoke("train", "--out", out, "--data-dir", tiny_data, "--epochs", 1, "--batch-size", 32, "--hidden",
                    32, "--latent-dim", 4, "--no-plots")
    assert result.exit_code == 0, result.output
    one_line_error(invoke("train", "--out", out, "--data-dir", tiny_data), "--resume", "--overwrite")
    result = invoke("train", "--out", out, "--data-dir", tiny_data, "--epochs", 1, "--batch-size", 32, "--hidden",
                    16, "--latent-dim", 2, "--no-plots", "--overwrite")
    assert result.exit_code == 0, result.output
    assert modeldir.model_config(out).latent_dim == 2


# ---- 4. one writer per model folder ----


def test_second_writer_gets_a_clear_error(tiny_data, tiny_model, tmp_path):
    out = tmp_path / "m"
    with modeldir.lock(out):
        one_line_error(invoke("train", "--out", out, "--data-dir", tiny_data), "another vae-engine process")
    assert not (out / modeldir.LOCK).exists()
    dst = copy_model(tiny_model, tmp_path / "e")
    with modeldir.lock(dst):
        one_line_error(invoke("export", dst), "another vae-engine process")
    # a real second process: it holds the lock while this one tries
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom vae_engine import modeldir\n"
                               f"with modeldir.lock({str(out)!r}):\n print('locked', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ModelDirError, match="another vae-engine process"):
            train(MODEL, _cfg(tiny_data, epochs=1), out, plots=False)
    finally:
        holder.kill()
        holder.wait()
    assert train(MODEL, _cfg(tiny_data, epochs=1), out, plots=False)  # the kill released it


# ---- 5. checkpoint and metrics stay consistent; plots are redrawn ----


def test_resume_restores_metrics_rows_and_missing_plots(tiny_data, tmp_path):
    out = tmp_path / "m"
    train(MODEL, _cfg(tiny_data, epochs=2), out, plots=False)
    lines = (out / modeldir.METRICS).read_text().splitlines()
    (out / modeldir.METRICS).write_text(lines[0] + "\n{broken json\n")  # killed between state and metrics
    train(None, _cfg(tiny_data, epochs=3), out, resume=True, plots=True)
    assert [r["epoch"] for r in modeldir.read_metrics(out)] == [1, 2, 3]
    shutil.rmtree(out / modeldir.PLOTS)  # killed while drawing the plots
    rows = train(None, _cfg(tiny_data, epochs=3), out, resume=True, plots=True)
    assert len(rows) == 3 and (out / modeldir.PLOTS / "training_curve.png").stat().st_size > 1000
    with pytest.raises(VaeEngineError, match="already finished 3 epochs"):
        train(None, _cfg(tiny_data, epochs=3), out, resume=True, plots=True)


def test_ctrl_c_in_train_says_what_was_kept(tiny_data, tmp_path, monkeypatch):
    import vae_engine.training.train as train_mod

    calls = []
    real = train_mod.test_elbo

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "test_elbo", interrupt_second_epoch)
    out = tmp_path / "m"
    line = one_line_error(invoke("train", "--out", out, "--data-dir", tiny_data, "--epochs", 3, "--batch-size", 32,
                                 "--hidden", 32, "--latent-dim", 4, "--no-plots"), "--resume", code=130)
    assert "checkpoint after epoch 1 is kept" in line
    monkeypatch.setattr(train_mod, "test_elbo", real)
    assert [r["epoch"] for r in train(None, _cfg(tiny_data, epochs=3), out, resume=True, plots=False)] == [1, 2, 3]


def test_ctrl_c_in_export_is_one_line(tiny_model, tmp_path, monkeypatch):
    class ExporterError(RuntimeError):
        pass

    def export_interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # the dynamo exporter wraps what stops it in its own error
            raise ExporterError("Failed to export the model with torch.export.\n" + "report line\n" * 100) from exc

    monkeypatch.setattr(torch.onnx, "export", export_interrupted)
    dst = copy_model(tiny_model, tmp_path / "m")
    before = sorted(p.name for p in dst.iterdir())
    one_line_error(invoke("export", dst), code=130)
    assert sorted(p.name for p in dst.iterdir()) == before


# ---- 6. full disk and read-only folders ----


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_an_error_line_and_leaves_nothing(small_disk, exported_model, tiny_data):
    result = invoke("sample", exported_model, "-n", 1000, "-o", small_disk / "out" / "x.npy")  # 3 MB > 1 MiB
    one_line_error(result, "no space left")
    assert list(small_disk.iterdir()) == []  # no temp, not even the folder it made
    with pytest.raises(OSError), open(small_disk / "filler", "wb", buffering=0) as f:  # fill the disk up
        while True:
            f.write(b"\0" * 4096)
    one_line_error(invoke("sample", exported_model, "-n", 64, "-o", small_disk / "x.png"), "no space left")
    one_line_error(invoke("train", "--out", small_disk / "run", "--data-dir", tiny_data, "--epochs", 1,
                          "--batch-size", 32, "--hidden", 32, "--latent-dim", 4), "no space left")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_read_only_and_wrong_kind_outputs_fail_before_work(tmp_path, exported_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        one_line_error(invoke("sample", exported_model, "-n", 4, "-o", ro / "x.npy"), "read-only")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    (tmp_path / "afile").write_text("x")
    one_line_error(invoke("sample", exported_model, "-n", 4, "-o", tmp_path / "afile" / "x.npy"), "is a file")
    (tmp_path / "dir.npy").mkdir()
    one_line_error(invoke("sample", exported_model, "-n", 4, "-o", tmp_path / "dir.npy"), "is a folder")
    one_line_error(invoke("evaluate", exported_model, "--json", tmp_path, "--k", 2), "is a folder")
    one_line_error(invoke("train", "--out", tmp_path / "afile"), "is a file")
    one_line_error(invoke("export", exported_model, "--out", tmp_path / "afile"), "is a file")


# ---- 7. stale temps of dead processes are cleaned up ----


def test_stale_temps_of_dead_writers_are_removed(exported_model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".z.npy{atomic.TMP_TAG}{dead.pid}-abc.npy"
    stale.write_bytes(b"\0" * 1000)
    stale_dir = tmp_path / f".export{atomic.TMP_TAG}{dead.pid}-xyz"
    stale_dir.mkdir()
    (stale_dir / "q_in.onnx").write_bytes(b"x")
    live = tmp_path / f".y.npy{atomic.TMP_TAG}{os.getppid()}-abc.npy"  # a live process's temp stays
    live.write_bytes(b"x")
    atomic._cleaned.discard(tmp_path.resolve())
    result = invoke("sample", exported_model, "-n", 4, "-o", tmp_path / "z.npy")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not stale_dir.exists() and live.exists()


def test_sigkilled_job_leaves_a_temp_that_the_next_run_removes(exported_model, tmp_path):
    out = tmp_path / "scores.npy"
    x = np.random.default_rng(0).integers(0, 256, (64, 784), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "vae_engine", "score", exported_model, "-i", tmp_path / "x.npy", "-o", out,
           "--k", 20000, "--batch-size", 1]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # wait until its temp output exists
            if leftovers(tmp_path):
                break
            if proc.poll() is not None:
                pytest.fail("the job finished before it could be killed")
            subprocess.run(["sleep", "0.05"])
        proc.kill()
    finally:
        proc.wait()
    assert leftovers(tmp_path) and not out.exists()
    atomic._cleaned.discard(tmp_path.resolve())
    result = invoke("score", exported_model, "-i", tmp_path / "x.npy", "-o", out, "--k", 2)
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == [] and np.load(out).shape == (64,)


# ---- 8. memory: decompression bombs and huge K ----


def test_gzip_bomb_stops_at_the_declared_size(tmp_path):
    header = idx_bytes(np.zeros((3, 28, 28), np.uint8), 2051)
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        zeros = b"\0" * (1 << 20)
        for _ in range(200):  # 200 MB of zeros behind a header that declares 2352 bytes
            f.write(zeros)
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    with pytest.raises(DataError, match="size mismatch"):
        data.read_idx(path, 2051)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_idx_dims_that_overflow_are_refused(tmp_path):
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(b"\0\0\x08\x03" + struct.pack(">III", 2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\0" * 64)
    one_line_error(invoke("encode", "-i", path, "-o", tmp_path / "z.npy"), "limit")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_png_bombs_are_error_lines(tmp_path):
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "a.png")
    raw = (folder / "a.png").read_bytes()
    # a header that claims 12000x12000 (the pixels are never decoded)
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)
    (folder / "b.png").write_bytes(raw[:8] + _png_chunk(b"IHDR", ihdr) + raw[33:])
    one_line_error(invoke("encode", "-i", folder, "-o", tmp_path / "z.npy"), "b.png", "too large")
    (folder / "b.png").unlink()
    # a zTXt chunk that inflates far past Pillow's text limit
    text = _png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
    (folder / "c.png").write_bytes(raw[:33] + text + raw[33:])
    one_line_error(invoke("encode", "-i", folder, "-o", tmp_path / "z.npy"), "c.png", "not a readable image")
    assert not (tmp_path / "z.npy").exists()


def test_huge_k_streams_in_bounded_memory_with_the_same_numbers(exported_model, monkeypatch):
    import vae_engine.runtime.engine as engine_mod

    engine = Engine.load(exported_model, backend="onnxruntime", threads=1)
    x = (np.random.default_rng(1).random((3, 784)) < 0.3).astype(np.float32)
    whole = engine.log_likelihood(x, k=300, seed=5)
    monkeypatch.setattr(engine_mod, "SCORE_ROWS", 64)  # 300 samples in blocks of 64 rows
    np.testing.assert_allclose(engine.log_likelihood(x, k=300, seed=5), whole, rtol=0, atol=2e-4)
    tracemalloc.start()
    engine.log_likelihood(x[:1], k=64 * 40, seed=5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak  # eps for all 2560 samples at once would not matter; per-block memory is ~200 KB


# ---- 9. crafted files and options: one line each ----


@pytest.mark.parametrize("model_section, fragment", [
    ({"latent_dim": 1_000_000_000}, "latent dim"),
    ({"hidden": [100_000_000]}, "hidden size"),
    ({"latent_dim": 4.5}, "integer"),
    ({"hidden": "400"}, "hidden"),
    ([1, 2], "'model' object"),
])
def test_crafted_config_values(tiny_model, tmp_path, model_section, fragment):
    dst = copy_model(tiny_model, tmp_path / "m")
    cfg = json.loads((dst / modeldir.CONFIG).read_text())
    cfg["model"] = {**cfg["model"], **model_section} if isinstance(model_section, dict) else model_section
    (dst / modeldir.CONFIG).write_text(json.dumps(cfg))
    one_line_error(invoke("info", dst), fragment)
    one_line_error(invoke("sample", dst, "-n", 2, "-o", tmp_path / "s.npy"), fragment)


def test_malformed_reports_do_not_break_info_or_resume(tiny_data, tmp_path):
    out = tmp_path / "m"
    train(MODEL, _cfg(tiny_data, epochs=1), out, plots=False)
    (out / modeldir.METRICS).write_text('{"epoch": "x"}\n[1, 2]\nnot json\n')
    (out / modeldir.EXPORT_REPORT).write_text("[")
    (out / modeldir.EVALUATION).write_text('{"test_nelbo": "a lot"}')
    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    assert "not valid JSON" in result.output and "Traceback" not in result.output
    assert [r["epoch"] for r in train(None, _cfg(tiny_data, epochs=2), out, resume=True, plots=False)] == [1, 2]


def test_npz_pickles_and_bad_arrays(tmp_path):
    np.savez(tmp_path / "a.npy", x=np.zeros((2, 784)))  # np.savez appends .npz
    os.replace(tmp_path / "a.npy.npz", tmp_path / "a.npy")
    one_line_error(invoke("encode", "-i", tmp_path / "a.npy", "-o", tmp_path / "z.npy"), ".npz archive")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    one_line_error(invoke("encode", "-i", tmp_path / "o.npy", "-o", tmp_path / "z.npy"), "not a readable .npy")
    np.save(tmp_path / "i.npy", np.full((2, 784), 7, np.int64))  # numbers are taken as they are: 7 is not in [0, 1]
    one_line_error(invoke("encode", "-i", tmp_path / "i.npy", "-o", tmp_path / "z.npy"), "[0, 1]")


@pytest.mark.parametrize("args, fragment", [
    (("sample", "-n", 2, "--threads", -1), "threads"),
    (("sample", "-n", 2, "--seed", -1), "seed"),
    (("sample", "-n", 2, "--seed", 2**40), "seed"),
    (("sample", "-n", "two"), "Invalid value for '-n'"),
    (("sample", "--no-such-option"), "No such option"),
    (("score", "-i", "x.npy", "-o", "s.npy", "--k", 0), "--k"),
    (("sample", "-n", 2, "--precision", "int8", "--backend", "auto"), "--quantize int8"),
])
def test_bad_options_are_one_line(tiny_model, tmp_path, args, fragment):
    cmd, *rest = args
    model = [] if "-i" in rest else [tiny_model]
    rest = [tmp_path / a if a in ("x.npy", "s.npy") else a for a in rest]
    if "-o" not in rest:
        rest += ["-o", tmp_path / "s.npy"]
    one_line_error(invoke(cmd, *model, *rest), fragment)


def test_more_bad_options_and_inputs_are_one_line(tiny_model, tmp_path):
    """bench takes --threads by the same rule as the jobs; evaluate's --columns needs --data; a file of no known
    kind says which kinds there are."""
    one_line_error(invoke("bench", tiny_model, "--threads", 0, "--json", tmp_path / "b.json"), "--threads")
    one_line_error(invoke("evaluate", tiny_model, "--columns", "a"), "pass --data too")
    (tmp_path / "notes.txt").write_text("hello")
    line = one_line_error(invoke("encode", tiny_model, "-i", tmp_path / "notes.txt", "-o", tmp_path / "z.npy"),
                          "not an IDX file")
    assert ".npy, .npz, .csv, .parquet" in line


def test_failed_job_leaves_no_new_folder(exported_model, tmp_path):
    z = np.zeros((5, 4), np.float32)
    z[3, 1] = np.nan
    np.save(tmp_path / "z.npy", z)
    one_line_error(invoke("decode", exported_model, "-i", tmp_path / "z.npy", "-o", tmp_path / "new" / "deep" /
                          "x.npy"), "NaN")
    assert not (tmp_path / "new").exists()


def test_unreadable_files_say_permission(tmp_path):
    from vae_engine.core.errors import os_error_reason

    assert "permission denied" in os_error_reason(PermissionError(13, "Permission denied"))
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8), 2051))
    path.chmod(0)
    with pytest.raises(DataError, match="permission denied"):
        data.read_idx(path)


# ---- 10. the Python API validates like the CLI ----


def test_engine_inputs_follow_the_cli_rule(exported_model):
    engine = Engine.load(exported_model, backend="onnxruntime", threads=1)
    x8 = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    xf = x8.reshape(4, 784).astype(np.float32) / 255
    np.testing.assert_allclose(engine.log_likelihood(x8, k=8), engine.log_likelihood(xf, k=8), rtol=1e-6)
    np.testing.assert_allclose(engine.encode(x8)[0], engine.encode(xf)[0], rtol=1e-6)
    for bad, fragment in ((xf * 255, "must lie in \\[0, 1\\]"), (xf[:, :100], "shape"),
                          (x8.astype(np.complex64), "complex64"), (np.full((1, 784), np.nan, np.float32), "NaN")):
        with pytest.raises(DataError, match=fragment):
            engine.log_likelihood(bad, k=2)
    with pytest.raises(VaeEngineError, match="k must be"):
        engine.log_likelihood(xf, k=0)
    with pytest.raises(DataError, match="NaN"):
        engine.decode(np.full((1, 4), np.inf))


def test_readme_python_example_runs_outside_the_clone(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "VAE_ENGINE_MODEL": ""})
    assert result.returncode == 0, result.stderr


# ---- 11. start-up: the CLI imports no heavy library until a command needs it ----


def test_cli_start_imports_no_heavy_library():
    heavy = ("torch", "onnx", "onnxruntime", "numba")
    code = f"import sys, vae_engine.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "vae_engine", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("vae-engine ")


def test_malformed_checksum_file_and_mismatched_posterior(tmp_path, tiny_data, exported_model):
    folder = tmp_path / "d"
    shutil.copytree(tiny_data, folder)
    (folder / "SHA256SUMS").write_text("not-a-digest\n")
    one_line_error(invoke("train", "--data-dir", folder, "--out", tmp_path / "o"), "SHA256SUMS", "line 1")
    assert not (tmp_path / "o").exists()
    engine = Engine.load(exported_model, backend="onnxruntime", threads=1)
    with pytest.raises(DataError, match="same shape"):  # the Numba kernel would read past mu's end
        engine.sample_posterior(np.zeros((1, 4)), np.zeros((3, 4)))


def test_values_beyond_float32_are_one_error_and_no_warning(exported_model, tmp_path):
    """float64 items or latents beyond float32's range: the input rule's error (naming the row), with no NumPy
    overflow warning printed before it."""
    import warnings

    from vae_engine.core.errors import DataError
    from vae_engine.runtime.engine import Engine

    engine = Engine.load(exported_model, backend="onnxruntime", threads=1)
    x = np.full((3, engine.cfg.input_dim), 0.5)
    x[2, 5] = 1e39
    z = np.zeros((2, engine.latent_dim))
    z[1, 0] = -1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would raise here instead of the DataError
        with pytest.raises(DataError, match="NaN or Inf in row 2 \\(or a value beyond float32's range\\)"):
            engine.reconstruct(x)
        with pytest.raises(DataError, match="beyond float32's range"):
            engine.decode(z)
        np.save(tmp_path / "x.npy", x)
        assert np.isinf(data.readers.read(tmp_path / "x.npy")[0][2, 5])  # read quietly; the rule refuses it


def test_first_line_of_any_exception_message():
    """One way to take an exception's message for a one-line error: the first non-empty line, bounded, or the
    class name when there is no message (a library's empty ValueError was an IndexError in some readers)."""
    from vae_engine.core.errors import first_line

    assert first_line(ValueError("\n  bad header  \nmore")) == "bad header"
    assert first_line(ValueError("")) == "ValueError" and first_line(RuntimeError()) == "RuntimeError"
    assert first_line(OSError("x" * 500), 20) == "x" * 20


def test_an_npy_reader_error_without_a_message_is_one_line(tmp_path, monkeypatch):
    import numpy as np

    from vae_engine.data import readers

    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 784), np.uint8))

    def fail(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(np, "load", fail)
    with pytest.raises(DataError, match=r"not a readable \.npy array \(ValueError\)"):
        readers.load_npy(path)
