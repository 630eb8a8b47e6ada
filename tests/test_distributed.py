"""Training under torchrun with 2 processes and gloo: same weights as one process, checkpoint and resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vae_engine import modeldir

pytestmark = pytest.mark.slow


def _train(args, out, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", "29517", "-m", "vae_engine"] if nproc > 1 else [sys.executable, "-m", "vae_engine"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # fp32: the equalities below are exact up to reduction order, which bf16 rounding would blur
    result = subprocess.run([*launcher, "train", "--out", str(out), "--no-plots", "--latent-dim", "4", "--hidden", "32",
                             "--seed", "5", "--precision", "fp32", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_ranks_equal_one_process_with_double_batch(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, "--limit", 64, "--epochs", 1, "--threads", 1]
    _train([*common, "--batch-size", 64], tmp_path / "one")  # one step on 64 images
    _train([*common, "--batch-size", 32], tmp_path / "two", nproc=2)  # one step, 2 ranks x 32 images
    a = load_file(str(tmp_path / "one" / modeldir.WEIGHTS))
    b = load_file(str(tmp_path / "two" / modeldir.WEIGHTS))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    rows = modeldir.read_metrics(tmp_path / "two")
    assert len(rows) == 1  # only rank 0 writes metrics


def test_two_ranks_checkpoint_and_resume(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, "--batch-size", 32, "--threads", 1]
    _train([*common, "--epochs", 1], tmp_path / "run", nproc=2)
    assert modeldir.read_metrics(tmp_path / "run")[-1]["epoch"] == 1
    _train([*common, "--epochs", 2, "--resume"], tmp_path / "run", nproc=2)
    assert [r["epoch"] for r in modeldir.read_metrics(tmp_path / "run")] == [1, 2]
    # the same two epochs in one process with the global batch (64) give the same weights
    _train(["--data-dir", tiny_data, "--batch-size", 64, "--threads", 1, "--epochs", 2], tmp_path / "single")
    a = load_file(str(tmp_path / "run" / modeldir.WEIGHTS))
    b = load_file(str(tmp_path / "single" / modeldir.WEIGHTS))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
