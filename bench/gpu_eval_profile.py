"""Where the shipped model's k-sample evaluation spends its time on a device: the wall time of N test items at
several chunk sizes (the evaluation's items per engine call), then one chunk of 100 items under torch.profiler
(kernel time on the device against wall time). Written for the next lent GPU (bench/gpu_checks.sh, part
`evalprofile`); runs on a CPU too.

    python bench/gpu_eval_profile.py cuda 2000 5000
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vae_engine import data, modeldir
from vae_engine.model.estimators import evaluate
from vae_engine.runtime.engine import Engine


def main() -> None:
    device, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model_dir = "models/mnist-vae"
    eng = Engine.load(model_dir, backend="torch", device=device, precision="fp32")
    images = data.load_test_data(modeldir.train_config(model_dir))[0][:n]
    eng.scores(data.to_float(images[:2]), 0, 2, 0)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for chunk in (100, 200, 400, 1000):
        sync()
        t = time.perf_counter()
        _, nll = evaluate(eng.scores, images, k, 0, chunk=chunk)
        sync()
        print(f"chunk {chunk}: {time.perf_counter() - t:.2f} s for {n} items, NLL {nll.mean():.4f}", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    x = data.to_float(images[:100])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        eng.scores(x, 0, k, 0)
        sync()
        wall = time.perf_counter() - t
    print(f"one chunk of 100 items under the profiler: wall {wall * 1e3:.1f} ms")
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
