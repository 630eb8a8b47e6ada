"""What an inference-only install runs, and what it imports: every CLI job on ONNX Runtime, `evaluate`, `detect`,
`info`, `--precision auto` and the Python API, each in a fresh process, on the shipped model (exported fp32 and
int8 graphs, a VampPrior). None of them may import PyTorch or matplotlib: the base install has neither (CI runs
this module in fresh virtual environments without them, on Python 3.10 and 3.13), and where they are installed
they cost a job seconds of start-up it does not need."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vae_engine.data import datasets
from vae_engine.modeldir import resolve_model_dir

SHIPPED = resolve_model_dir(None)  # the clone's models/mnist-vae, or the installed wheel's copy
HEAVY = ("torch", "matplotlib", "onnxscript")  # never needed by an inference path
# imported only by the jobs that run them: onnx to merge the fused reconstruct graph (checks read the wire
# format), Numba's compiler (numba.core) and SciPy, which it imports, for the jobs whose kernels pay its set-up
NEEDED_BY = {"onnx": {"reconstruct"},
             "numba.core": {"score-k1", "score-k16", "score-int8", "detect", "evaluate"},
             "scipy": {"score-k1", "score-k16", "score-int8", "detect", "evaluate"}}
# runs the CLI in a fresh interpreter, then prints the heavy modules it imported as JSON on the last stderr line
RUNNER = textwrap.dedent("""
    import atexit, json, sys
    atexit.register(lambda: print("IMPORTED " + json.dumps(sorted(m for m in sys.modules if m in HEAVY)),
                                  file=sys.stderr))
    HEAVY = set(json.loads(sys.argv.pop(1)))
    sys.argv[0] = "vae-engine"
    from vae_engine.cli import main
    main()
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A private copy of the shipped model, with a detector calibrated on 300 test images (no training)."""
    from vae_engine import VAEOutlierDetector

    out = tmp_path_factory.mktemp("inference") / "mnist-vae"
    shutil.copytree(SHIPPED, out, ignore=shutil.ignore_patterns("tuning.json", "plots"))
    x = datasets.load_split(datasets.bundled_dir(), "test")[0][:300].reshape(300, -1).astype(np.float32) / 255
    det = VAEOutlierDetector(rule="reconstruction", contamination=0.1, backend="onnxruntime", threads=2)
    det.calibrate(out, x, seed=0)
    det.save(out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    x = datasets.load_split(datasets.bundled_dir(), "test")[0][:64]
    np.save(folder / "x.npy", x)
    np.save(folder / "z.npy", np.random.default_rng(0).standard_normal((16, 50)).astype(np.float32))
    return folder


def run(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`vae-engine ARGS` in a fresh process (its own cache folder): (the result, the heavy modules it imported,
    HEAVY and NEEDED_BY)."""
    env = {**os.environ, "VAE_ENGINE_CACHE": str(cwd / "cache")}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([*HEAVY, *NEEDED_BY]), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert last.startswith("IMPORTED "), r.stderr
    return r, json.loads(last.removeprefix("IMPORTED "))


ORT = ("--backend", "onnxruntime", "--precision", "fp32", "--threads", "2")
JOBS = {
    "encode": (["encode", "{model}", "-i", "{x}", "-o", "out.npy", *ORT], (64, 50)),
    "encode-sample": (["encode", "{model}", "-i", "{x}", "-o", "out.npy", "--sample", *ORT], (64, 50)),
    "decode": (["decode", "{model}", "-i", "{z}", "-o", "out.npy", *ORT], (16, 784)),
    "decode-png": (["decode", "{model}", "-i", "{z}", "-o", "out.png", *ORT], None),
    "sample": (["sample", "{model}", "-n", "32", "-o", "out.npy", *ORT], (32, 784)),
    "sample-png": (["sample", "{model}", "-n", "32", "-o", "out.png", *ORT], None),
    "reconstruct": (["reconstruct", "{model}", "-i", "{x}", "-o", "out.npy", *ORT], (64, 784)),
    "score-k1": (["score", "{model}", "-i", "{x}", "-o", "out.npy", "--k", "1", *ORT], (64,)),
    "score-k16": (["score", "{model}", "-i", "{x}", "-o", "out.npy", "--k", "16", *ORT], (64,)),
    "score-int8": (["score", "{model}", "-i", "{x}", "-o", "out.npy", "--backend", "onnxruntime", "--precision",
                    "int8", "--threads", "2"], (64,)),
    "detect": (["detect", "{model}", "-i", "{x}", "-o", "out.npy", "--backend", "onnxruntime", "--threads", "2"],
               (64,)),
    "evaluate": (["evaluate", "{model}", "--limit", "32", "--k", "8", "--threads", "2", "--json", "out.json"], None),
    "info": (["info", "{model}"], None),
}


@pytest.mark.parametrize("job", JOBS)
def test_each_job_runs_without_torch_or_matplotlib(job, model, files, tmp_path):
    args, shape = JOBS[job]
    args = [a.format(model=model, x=files / "x.npy", z=files / "z.npy") for a in args]
    r, imported = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [m for m in imported if m in HEAVY] == [], f"{job} imported {imported}"
    assert {m for m in imported if m in NEEDED_BY} <= {m for m, jobs in NEEDED_BY.items() if job in jobs}, imported
    if shape is not None:
        assert np.load(tmp_path / "out.npy").shape == shape
    elif job.endswith("png"):
        assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_precision_auto_runs_without_torch_where_graphs_are_exported(model, files, tmp_path):
    """auto's accuracy reference is ONNX Runtime's fp32 graphs, and PyTorch eager is not a CPU candidate where
    they exist: the decision, first measured or reused, imports torch only where it chose a torch path (bf16 on a
    CPU with native bf16 and no OpenVINO)."""
    for _ in range(2):
        r, imported = run("encode", str(model), "-i", str(files / "x.npy"), "-o", "out.npy", "--threads", "2",
                          cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "matplotlib" not in imported
        assert ("torch" in imported) == ("path torch/" in " ".join(r.stdout.split())), (r.stdout, imported)


def test_python_api_without_torch(model, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from vae_engine import Engine
        engine = Engine.load({str(model)!r}, backend="onnxruntime", threads=2)
        z = engine.sample(8, seed=1)
        mu, logvar = engine.encode(z)
        nll = -engine.log_likelihood(z, k=4)
        assert z.shape == (8, 784) and mu.shape == (8, 50) and np.isfinite(nll).all()
        print(sorted(m for m in ("torch", "matplotlib") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("torch") is not None,
                    reason="PyTorch is installed here: the inference-only install is tested in CI's fresh venvs")
def test_commands_that_need_torch_name_the_extra(model, tmp_path):
    for args in (["train", "--out", "run", "--epochs", "1", "--limit", "100"], ["export", str(model)],
                 ["encode", str(model), "-i", "x.npy", "-o", "z.npy", "--backend", "torch", "--precision", "fp32"]):
        if args[0] == "encode":
            np.save(tmp_path / "x.npy", np.zeros((2, 784), np.uint8))
        r, _ = run(*args, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()[:-1]  # without the runner's own last line
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and "pip install 'vae-engine[train]'" in lines[0], lines
