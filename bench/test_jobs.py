"""The job benchmark in the pytest-benchmark suite: each `vae-engine` job as a whole process against its raw
ONNX Runtime twin (`raw_jobs.py`), one group per job, warm (the decision saved, kernels cached). A plain `pytest`
runs each command once, untimed, so neither the jobs nor their twins can rot; `pytest --benchmark` times them
(and `python bench/jobs_bench.py` also times first use, with a table for the docs)."""

from __future__ import annotations

import os
import shutil

import pytest

from . import jobs_bench

NAMES = tuple(jobs_bench.jobs(jobs_bench.Path("m"), {"idx": "i", "x1k": "x", "z": "z"}, jobs_bench.Path("o")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vae_engine.modeldir import resolve_model_dir

    work = tmp_path_factory.mktemp("jobs")
    model = jobs_bench.fresh_model(resolve_model_dir(None), work)
    jobs_bench.with_detector(model)
    (work / "out").mkdir()
    env = {**os.environ, "VAE_ENGINE_CACHE": str(work / "cache")}
    yield jobs_bench.jobs(model, jobs_bench.inputs(work / "inputs"), work / "out"), env
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.skipif(shutil.which("vae-engine") is None, reason="the vae-engine command is not installed")
@pytest.mark.parametrize("kind", ["vae-engine", "raw"])
@pytest.mark.parametrize("job", NAMES)
def test_job(benchmark, setup, job, kind):
    commands, env = setup
    cmd = commands[job][0 if kind == "vae-engine" else 1]
    benchmark.group = f"job: {job}"
    benchmark.extra_info["command"] = " ".join(cmd)
    seconds = benchmark.pedantic(jobs_bench.timed, args=(cmd, env), rounds=3, iterations=1, warmup_rounds=1)
    assert seconds > 0
