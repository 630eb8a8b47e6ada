"""`--precision auto` on the machine classes this machine is not: the hardware facts are pretended
(`hardware.pretend`), and for each class the README describes (AVX2 only; AVX-512 with BF16 and VNNI; AMX; a CUDA
GPU) the candidates, the notes and the decision are checked. The decision is checked twice: against speeds and
accuracy costs given per class (the figures measured on real machines of that class, so the expected answer is
known), and by really measuring every candidate path on this CPU, which runs each backend code path a class can
take (OpenVINO bf16 included: where the CPU lacks bf16 it quietly runs fp32, which is still its code path)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from vae_engine.core import hardware
from vae_engine.runtime import backends, tuning
from vae_engine.runtime.engine import Engine

AVX2 = hardware.Machine("AMD EPYC (AVX2)", frozenset({"avx2", "fma"}))
AVX512_BF16_VNNI = hardware.Machine("AMD EPYC (Zen 4)", frozenset({"avx2", "fma", "avx512f", "avx512_bf16",
                                                                    "avx512_vnni"}))
AMX = hardware.Machine("Intel Xeon (Sapphire Rapids)", frozenset({"avx2", "fma", "avx512f", "avx512_bf16",
                                                                  "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}))
CUDA = hardware.Machine("Intel Xeon (Sapphire Rapids)", AMX.flags, gpu="NVIDIA H100 80GB HBM3")
CLASSES = {"avx2": AVX2, "avx512-bf16-vnni": AVX512_BF16_VNNI, "amx": AMX, "cuda": CUDA}

TORCH, ORT, OV = "torch", "onnxruntime", "openvino"
# class -> OpenVINO installed? -> the candidates `auto` measures (for a model exported in fp32 and int8): on the
# CPU the exported graphs (int8 too, wherever exported), not PyTorch eager
EXPECTED = {
    "avx2": {True: [(ORT, "fp32"), (OV, "fp32"), (ORT, "int8")], False: [(ORT, "fp32"), (ORT, "int8")]},
    "avx512-bf16-vnni": {True: [(ORT, "fp32"), (OV, "fp32"), (OV, "bf16"), (ORT, "int8")],
                         False: [(ORT, "fp32"), (TORCH, "bf16"), (ORT, "int8")]},
    "amx": {True: [(ORT, "fp32"), (OV, "fp32"), (OV, "bf16"), (ORT, "int8")],
            False: [(ORT, "fp32"), (TORCH, "bf16"), (ORT, "int8")]},
    # a GPU: no int8 path there (ONNX Runtime's int8 graphs are a CPU path), ONNX Runtime fp32 with its CUDA provider
    "cuda": {True: [(TORCH, "fp32"), (ORT, "fp32"), (TORCH, "bf16"), (TORCH, "fp16")],
             False: [(TORCH, "fp32"), (ORT, "fp32"), (TORCH, "bf16"), (TORCH, "fp16")]},
}
DEVICE = {"cuda": "cuda"}  # the device a job on that class asks for


@pytest.fixture()
def model(exported_model, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(exported_model, out)  # decisions of pretended machines stay out of the shared fixture
    return out


@pytest.mark.parametrize("openvino", [True, False], ids=["openvino", "no-openvino"])
@pytest.mark.parametrize("name", CLASSES)
def test_candidates_and_notes(model, name, openvino, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(backends, "openvino_installed", lambda: openvino)
    if name == "cuda":  # the GPU build of ONNX Runtime, as such a machine would have
        monkeypatch.setattr(onnxruntime, "get_available_providers",
                            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with hardware.pretend(CLASSES[name]):
        paths, notes = tuning.candidates(model, device=DEVICE.get(name, "cpu"))
        assert paths == EXPECTED[name][openvino]
        no_bf16 = any("no native bf16" in n for n in notes)
        assert no_bf16 == (name == "avx2"), notes
        # int8 left out only when asked
        assert (ORT, "int8") not in tuning.candidates(model, device=DEVICE.get(name, "cpu"), int8=False)[0]


def test_a_gpu_times_only_the_paths_it_can_run(model):
    """On a GPU whose ONNX Runtime is the CPU build (as on a machine with CUDA PyTorch and the base install), and
    with int8 graphs exported (a CPU path): neither is timed, and the notes say why (before, auto opened them and
    failed the job)."""
    with hardware.pretend(CUDA):
        paths, notes = tuning.candidates(model, device="cuda")
    assert (ORT, "int8") not in paths and (ORT, "fp32") not in paths and (TORCH, "fp32") in paths
    assert any(n.startswith("onnxruntime/int8: ") for n in notes)
    assert any(n.startswith("onnxruntime/fp32: ") and "CUDA provider" in n for n in notes)


def test_notes_say_what_is_not_exported(tiny_model):
    with hardware.pretend(AMX):
        paths, notes = tuning.candidates(tiny_model)
    assert paths == [(TORCH, "fp32"), (TORCH, "bf16")]  # nothing exported: PyTorch
    assert any("not exported" in n for n in notes) and any("int8: not exported" in n for n in notes)


# (class, budget) -> the decision, for speeds (items/s) and costs (mean NLL change, nats) of real machines of that
# class (README and issue measurements of the shipped model at batch 1024; GPU: the H100 run)
SPEEDS = {
    "avx2": {(TORCH, "fp32"): (62.0e3, 0), (ORT, "fp32"): (65.5e3, 0), (OV, "fp32"): (64.0e3, 0),
             (ORT, "int8"): (110e3, 0.099)},
    "avx512-bf16-vnni": {(TORCH, "fp32"): (60e3, 0), (ORT, "fp32"): (128e3, 0), (OV, "fp32"): (125e3, 0),
                         (OV, "bf16"): (203e3, 0.007), (TORCH, "bf16"): (150e3, 0.006), (ORT, "int8"): (346e3, -0.012)},
    "amx": {(TORCH, "fp32"): (24e3, 0), (ORT, "fp32"): (22e3, 0), (OV, "fp32"): (25e3, 0), (OV, "bf16"): (52e3, 0.007),
            (TORCH, "bf16"): (40e3, 0.0065), (ORT, "int8"): (75e3, 0.0052)},
    "cuda": {(TORCH, "fp32"): (3.0e6, 0), (ORT, "fp32"): (0.3e6, 0), (TORCH, "bf16"): (2.99e6, 0.003),
             (TORCH, "fp16"): (3.1e6, -0.0008), (ORT, "int8"): (1.2e6, 0.05)},
}
DECISIONS = {
    ("avx2", 0.01): (ORT, "fp32"), ("avx2", 0.2): (ORT, "int8"),  # int8 (+0.099 without VNNI) in a wide budget
    ("avx512-bf16-vnni", 0.01): (OV, "bf16"), ("avx512-bf16-vnni", 0.02): (ORT, "int8"),
    ("avx512-bf16-vnni", 0.0): (ORT, "fp32"),
    ("amx", 0.01): (ORT, "int8"), ("amx", 0.005): (OV, "fp32"),  # 0.005: int8 (+0.0052) and bf16 (+0.007) cost too much
    ("cuda", 0.01): (TORCH, "fp16"), ("cuda", 0.0): (TORCH, "fp32"),
}


def fake_measurements(monkeypatch, speed, cost):
    """Replace the two measurements of `choose` by given figures: `speed(backend, precision, threads)` items/s and
    `cost(backend, precision)` nats; returns the list of (paths timed, threads) of each decision measured."""
    timed = []

    def accuracies(load, model_dir, paths, threads, device="cpu", progress=None):
        return {(b, p): None if p == "fp32" else {"nll_change_nats": cost(b, p), "nll_change_se_nats": 0.0}
                for b, p in paths}

    def time_paths(load, model_dir, paths, threads, batch, device="cpu", seconds=0.0, progress=None, items=None):
        timed.append((list(paths), list(threads)))
        return [{"backend": b, "precision": p, "threads": n, "provider": device, "items_per_s": speed(b, p, n)}
                for b, p in paths for n in threads], True

    monkeypatch.setattr(tuning, "accuracies", accuracies)
    monkeypatch.setattr(tuning, "time_paths", time_paths)
    return timed


@pytest.mark.parametrize("name,budget", list(DECISIONS), ids=[f"{n}-{b}" for n, b in DECISIONS])
def test_decision_for_each_class(model, name, budget, monkeypatch):
    figures = SPEEDS[name]
    timed = fake_measurements(monkeypatch, lambda b, p, n: figures.get((b, p), (1.0, 0.0))[0],
                              lambda b, p: figures.get((b, p), (1.0, 0.0))[1])
    monkeypatch.setattr(backends, "openvino_installed", lambda: True)
    device = DEVICE.get(name, "cpu")
    with hardware.pretend(CLASSES[name]):
        d = tuning.choose(Engine.load, model, device=device, threads=2, batch=1024, budget=budget)
        again = tuning.choose(Engine.load, model, device=device, threads=2, batch=1024, budget=budget)
        paths = tuning.candidates(model, device=device)[0]
        over = [p for p in paths if p[1] != "fp32" and abs(figures.get(p, (1.0, 0.0))[1]) > budget]
        assert timed[0][0] == [p for p in paths if p not in over]  # paths over the budget are not timed
    assert (d["backend"], d["precision"], d["threads"]) == (*DECISIONS[name, budget], 2)
    assert d["key"]["flags"] == sorted(f for f in hardware.KEY_FLAGS if f in CLASSES[name].flags)
    assert d["key"]["gpu"] == CLASSES[name].gpu if name == "cuda" else d["key"]["gpu"] is None
    assert again["reused"] and len(timed) == 1  # the same class reuses its saved decision
    with hardware.pretend(AVX2 if name != "avx2" else AMX):  # another class measures again
        tuning.choose(Engine.load, model, threads=2, batch=1024, budget=budget)
    assert len(timed) == 2


@pytest.mark.parametrize("batch,fast_threads", [(1, 1), (1, 4), (1024, 4)])
def test_thread_count_is_part_of_the_decision_for_small_batches(model, monkeypatch, batch, fast_threads):
    """Unpinned threads: a small batch compares every available CPU with one thread and keeps the faster (the
    engine then runs with it); a large batch uses every CPU without measuring one thread. Pinned: as given."""
    seen = fake_measurements(monkeypatch, lambda b, p, n: 2.0 if n == fast_threads else 1.0, lambda b, p: 0.0)
    monkeypatch.setattr(hardware, "available_cpus", lambda: 4)
    d = tuning.choose(Engine.load, model, threads=None, batch=batch, retune=True)
    assert seen[-1][1] == ([4, 1] if batch <= tuning.SMALL_BATCH else [4])
    assert d["threads"] == (fast_threads if batch <= tuning.SMALL_BATCH else 4)
    assert d["key"]["threads"] == "auto (4 CPUs)"
    assert tuning.choose(Engine.load, model, threads=3, batch=batch, retune=True)["threads"] == 3
    assert seen[-1][1] == [3]
    engine = Engine.load(model, precision="auto", batch_size=batch)  # reuses the first decision
    assert engine.threads == d["threads"] and engine.decision["reused"]
    monkeypatch.undo()
    backends.set_threads(None)  # this process's thread count as the other tests expect it


@pytest.mark.parametrize("name", ["avx2", "avx512-bf16-vnni", "amx"])
def test_every_candidate_really_runs_here(model, name):
    """Each CPU class's candidates measured for real on this CPU: every code path `auto` can pick there runs,
    gives finite results, and the engine the decision names encodes."""
    with hardware.pretend(CLASSES[name]):
        paths, _ = tuning.candidates(model)
        for b, p in paths:
            why = backends.unavailable(b, p, "cpu", model)
            if why:
                pytest.skip(f"{b}/{p}: {why}")
        d = tuning.choose(Engine.load, model, threads=2, batch=64, seconds=0.05, budget=1.0)
        assert [(r["backend"], r["precision"]) for r in d["measurements"]] == paths  # a wide budget: all timed
        for r in d["measurements"]:
            assert r["items_per_s"] > 0 and (r["precision"] == "fp32" or np.isfinite(r["nll_change_nats"]))
        engine = Engine.load(model, precision="auto", threads=2, batch_size=64, max_nll_change=1.0)
        chosen = (engine.backend.name, engine.backend.precision)  # d's, or a re-check's where d was unclear
        assert chosen == (engine.decision["backend"], engine.decision["precision"]) and chosen in paths
        mu, logvar = engine.encode(np.full((3, 784), 0.5, np.float32))
        assert mu.shape == (3, engine.latent_dim) and np.isfinite(logvar).all()


def test_a_gpu_asked_for_and_missing_is_an_error_not_a_cpu_run(model, monkeypatch):
    """--device cuda without a usable GPU: one clear error whatever the path (ONNX Runtime would otherwise run on
    its CPU provider, quietly), and before `--precision auto` measures anything."""
    from vae_engine.core.errors import VaeEngineError

    if hardware.cuda_available():
        pytest.skip("a real GPU is here")
    for backend, precision in [("auto", "fp32"), (ORT, "fp32"), (TORCH, "fp32"), ("auto", "auto")]:
        for device in ("cuda", "cuda:0"):
            with pytest.raises(VaeEngineError, match=f"--device {device}: torch sees no CUDA GPU"):
                Engine.load(model, backend=backend, precision=precision, device=device)
    assert Engine.load(model, backend=ORT, device="auto").backend.provider == "CPUExecutionProvider"  # no GPU here
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with hardware.pretend(CUDA):  # a GPU torch sees, and ONNX Runtime without its CUDA provider
        with pytest.raises(VaeEngineError, match="--device cuda: onnxruntime has no CUDA provider"):
            backends.load_backend(model, ORT, "fp32", device="cuda")
