"""Batch jobs on a local Ray Data cluster give the same results as the single-process jobs."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed (optional extra 'distributed')")

from vae_engine import data
from vae_engine.jobs import batch as jobs  # noqa: E402
from vae_engine.jobs import ray_jobs
from vae_engine.runtime.engine import Engine  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(exported_model):
    return exported_model


def test_ray_jobs_equal_single_process(ray_cluster, model, tiny_data, tmp_path):
    images, _ = data.load_split(tiny_data, "test")
    np.save(tmp_path / "x.npy", np.concatenate([images] * 3))  # 192 images
    engine = Engine.load(model, backend="onnxruntime", threads=1)
    for job, params in (("score", {"k": 8, "seed": 3}), ("encode", {"sample": True, "with_logvar": True, "seed": 1})):
        ray_jobs.run(job, model, tmp_path / "x.npy", tmp_path / f"{job}_ray.npy", actors=2, batch_size=50, **params)
        jobs.stream(jobs.open_items(tmp_path / "x.npy", engine.cfg), jobs.make_job_fn(job, engine, params),
                 tmp_path / f"{job}.npy", jobs.item_shape(job, engine.cfg, params), batch_size=64)
        np.testing.assert_allclose(np.load(tmp_path / f"{job}_ray.npy"), np.load(tmp_path / f"{job}.npy"), rtol=1e-6)


def test_ray_parquet_output(ray_cluster, model, tiny_data, tmp_path):
    import pyarrow.parquet as pq

    ray_jobs.run("reconstruct", model, tiny_data / "t10k-images-idx3-ubyte.gz", tmp_path / "r.parquet", actors=1)
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == 64 and set(table.column_names) == {"index", "y"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
