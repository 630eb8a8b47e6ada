"""The job benchmark: what a user waits for. Each `vae-engine` job is timed as a whole process, from the shell to
the written file, against its twin in `raw_jobs.py` (the same work by ONNX Runtime and NumPy alone), in
interleaved runs on the same machine, so each ratio is what the engine costs on top of the runtime: start-up,
checks, the `--precision auto` decision and writing.

Two situations:
- warm: the model folder's decision is saved and Numba's kernels are cached (every job after the first);
- first use: a fresh copy of the model folder (no tuning.json; the shipped accuracy.json kept, as a wheel ships
  it) and an empty user cache folder, so `auto` times its candidates.

Run:  python bench/jobs_bench.py [--repeats 5] [--json bench/results/jobs.json] [--markdown docs/benchmarks/jobs.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RAW = HERE / "raw_jobs.py"
ITEMS = 10_000  # the MNIST test set
SCORE_ITEMS = 1_000  # k=64 scoring: 64,000 decoder rows


def inputs(folder: Path) -> dict[str, Path]:
    """The jobs' input files: MNIST test images (IDX, as shipped), 1,000 of them as .npy, 10,000 latents."""
    from vae_engine.data import datasets

    folder.mkdir(parents=True, exist_ok=True)
    idx = datasets.bundled_dir() / "t10k-images-idx3-ubyte.gz"
    images = datasets.load_split(datasets.bundled_dir(), "test")[0]
    np.save(folder / "x1k.npy", images[:SCORE_ITEMS])
    np.save(folder / "z.npy", np.random.default_rng(0).standard_normal((ITEMS, 50)).astype(np.float32))
    return {"idx": idx, "x1k": folder / "x1k.npy", "z": folder / "z.npy"}


def jobs(model: Path, files: dict[str, Path], out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """job name -> (the vae-engine command, its raw twin), as argument lists."""
    cli = ["vae-engine"]
    raw = [sys.executable, str(RAW)]
    m, idx, x1k, z = str(model), str(files["idx"]), str(files["x1k"]), str(files["z"])
    return {
        "encode": (cli + ["encode", m, "-i", idx, "-o", f"{out}/a.npy"], raw + ["encode", m, idx, f"{out}/b.npy"]),
        "decode": (cli + ["decode", m, "-i", z, "-o", f"{out}/a.npy"], raw + ["decode", m, z, f"{out}/b.npy"]),
        "reconstruct": (cli + ["reconstruct", m, "-i", idx, "-o", f"{out}/a.npy"],
                        raw + ["reconstruct", m, idx, f"{out}/b.npy"]),
        "sample .npy": (cli + ["sample", m, "-n", str(ITEMS), "-o", f"{out}/a.npy"],
                        raw + ["sample", m, str(ITEMS), f"{out}/b.npy"]),
        "sample .png": (cli + ["sample", m, "-n", "64", "-o", f"{out}/a.png"],
                        raw + ["sample", m, "64", f"{out}/b.png"]),
        "score k=1": (cli + ["score", m, "-i", idx, "-o", f"{out}/a.npy", "--k", "1"],
                      raw + ["score", m, idx, f"{out}/b.npy", "1"]),
        "score k=64": (cli + ["score", m, "-i", x1k, "-o", f"{out}/a.npy", "--k", "64"],
                       raw + ["score", m, x1k, f"{out}/b.npy", "64"]),
        "evaluate --limit 1000 --k 64": (cli + ["evaluate", m, "--limit", "1000", "--k", "64"],
                                         raw + ["score", m, x1k, f"{out}/b.npy", "64"]),
        "detect": (cli + ["detect", m, "-i", idx, "-o", f"{out}/a.npy"], raw + ["detect", m, idx, f"{out}/b.npy"]),
        "serve until ready": (cli + ["serve", m, "--port", "{port}"], raw + ["serve", m, "{port}", "-"]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(args: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning the command to its end (for `serve`: to its first ready answer, then stopped)."""
    port = _free_port()
    args = [a.replace("{port}", str(port)) for a in args]
    t0 = time.perf_counter()
    if args[:2] == ["vae-engine", "serve"]:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}") from None
                    time.sleep(0.005)
            return time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def fresh_model(shipped: Path, parent: Path) -> Path:
    """A copy of a model folder as a user gets it: no saved decisions."""
    out = Path(tempfile.mkdtemp(dir=parent)) / shipped.name
    shutil.copytree(shipped, out, ignore=shutil.ignore_patterns("tuning.json", "plots"))
    return out


def with_detector(model: Path) -> None:
    """The reconstruction rule calibrated on 1,000 test images (what `train --contamination` would store)."""
    from vae_engine import VAEOutlierDetector
    from vae_engine.data import datasets

    x = datasets.load_split(datasets.bundled_dir(), "test")[0][:1000].reshape(1000, -1).astype(np.float32) / 255
    det = VAEOutlierDetector(rule="reconstruction", contamination=0.1, backend="onnxruntime")
    det.calibrate(model, x, seed=0)
    det.save(model)


def run(repeats: int = 5, names: list[str] | None = None) -> dict:
    """Time every job warm and on first use against its raw twin; returns the report."""
    from vae_engine.core import hardware
    from vae_engine.modeldir import resolve_model_dir, versions

    shipped = resolve_model_dir(None)
    work = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    try:
        files = inputs(work / "inputs")
        (work / "out").mkdir()
        # bytecode cached as an installed wheel has it (pip compiles at install): an editable install under
        # PYTHONDONTWRITEBYTECODE would compile every module of the engine from source on every run (~70 ms)
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
               "VAE_ENGINE_CACHE": str(work / "cache"), "PYTHONPYCACHEPREFIX": str(work / "pycache")}
        warm_model = fresh_model(shipped, work)
        with_detector(warm_model)
        commands = jobs(warm_model, files, work / "out")
        rows = []
        for name, (cli, raw) in commands.items():
            if names and name not in names:
                continue
            timed(cli, env), timed(raw, env)  # the decision saved, kernels cached, files in the page cache
            warm = {"cli": [], "raw": []}
            first = []
            for _ in range(repeats):  # interleaved: a busy moment hits both
                warm["cli"].append(timed(cli, env))
                warm["raw"].append(timed(raw, env))
                model = fresh_model(shipped, work)
                if name == "detect":
                    with_detector(model)
                env_first = {**env, "VAE_ENGINE_CACHE": tempfile.mkdtemp(dir=work)}
                first.append(timed([a.replace(str(warm_model), str(model)) for a in cli], env_first))
            raw_s = float(np.median(warm["raw"]))
            rows.append({"job": name, "command": " ".join(cli[1:]).replace(str(work), "$WORK"),
                         "raw_s": raw_s, "warm_s": float(np.median(warm["cli"])),
                         "first_use_s": float(np.median(first)), "warm_ratio": float(np.median(warm["cli"])) / raw_s,
                         "first_use_ratio": float(np.median(first)) / raw_s, "repeats": repeats,
                         "samples": {"raw": warm["raw"], "warm": warm["cli"], "first_use": first}})
            print(f"{name:32s} raw {raw_s:6.2f} s  warm {rows[-1]['warm_s']:6.2f} s "
                  f"({rows[-1]['warm_ratio']:.2f}x)  first use {rows[-1]['first_use_s']:6.2f} s "
                  f"({rows[-1]['first_use_ratio']:.2f}x)", flush=True)
        return {"machine": hardware.describe(2), "versions": versions(), "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "items": ITEMS, "score_items": SCORE_ITEMS,
                "command": "python bench/jobs_bench.py", "jobs": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


SECTION = "jobs-table"  # the generated section of docs/benchmarks/jobs.md


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['available_cpus']} CPUs, flags {' '.join(m['flags'])}; Python "
             f"{report['python']}; onnxruntime {report['versions']['onnxruntime']}; {report['date']}; medians of "
             f"{report['repeats']} interleaved runs (`{report['command']}`).", "",
             "| job | raw script | warm | ratio | first use | ratio |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["jobs"]:
        lines.append(f"| `{r['job']}` | {r['raw_s']:.2f} s | {r['warm_s']:.2f} s | {r['warm_ratio']:.2f}x | "
                     f"{r['first_use_s']:.2f} s | {r['first_use_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", help="comma-separated job names (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    a = parser.parse_args()
    report = run(a.repeats, a.jobs.split(",") if a.jobs else None)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    if a.markdown:  # the table between the page's markers, or the whole file
        from vae_engine.perf import pages

        pages.write_section(a.markdown, SECTION, markdown(report))
