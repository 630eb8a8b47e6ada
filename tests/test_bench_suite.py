"""`pytest --benchmark`: the suite runs timed, is saved, and a later run is compared with it by ratios to the machine
probe; a ratio past the allowed growth fails the run (and does not become the new baseline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from bench import plugin

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str, median: float):
    return SimpleNamespace(fullname=name, stats=SimpleNamespace(median=median, rounds=5))


def test_ratios_are_to_the_probe_and_regressions_are_growths_past_the_limit():
    now = plugin.ratios([_bench("bench/test_machine.py::test_machine_probe", 2.0), _bench("a", 1.0),
                         _bench("b", 8.0)])
    assert now == {"a": 0.5, "b": 4.0}
    assert plugin.ratios([_bench("a", 1.0)]) == {}  # no probe, no ratios
    assert plugin.compare(now, {"a": 0.4, "b": 2.0, "gone": 1.0}, 1.5) == [("b", 2.0, 4.0)]
    assert plugin.compare(now, {}, 1.5) == []


BENCH = """
import os, time

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

def test_machine_probe(benchmark):
    benchmark(spin, 0.002)

def test_work(benchmark):
    benchmark(spin, 0.002 * float(os.environ.get("SLOWER", "1")))

def test_not_a_benchmark():
    pass
"""


def _run(folder: Path, slower: float) -> subprocess.CompletedProcess:
    """`pytest --benchmark` on a two-benchmark suite (the probe and one piece of work `slower` times as long)."""
    return subprocess.run([sys.executable, "-m", "pytest", "--benchmark", str(folder / "test_suite.py"), "-q",
                           "-p", "bench.plugin", "--rootdir", str(folder), "-c", str(folder / "pytest.ini"),
                           f"--benchmark-storage=file://{folder / 'store'}", "--benchmark-min-rounds=5",
                           "--benchmark-max-time=0.05"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLOWER": str(slower), "PYTHONPATH": str(ROOT)})


def test_pytest_benchmark_saves_compares_and_fails_on_a_regression(tmp_path):
    (tmp_path / "test_suite.py").write_text(BENCH)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    first = _run(tmp_path, 1)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "1 deselected" in first.stdout  # the test without the benchmark fixture is not run
    saved = tmp_path / "store" / f"ratios-{plugin.machine_id()}.json"
    baseline = json.loads(saved.read_text())["ratios"]
    assert list(baseline) == ["test_suite.py::test_work"] and 0.5 < baseline["test_suite.py::test_work"] < 2
    assert list((tmp_path / "store").rglob("0001_*.json"))  # pytest-benchmark's own autosave
    slow = _run(tmp_path, 5)  # the work takes 5x the probe's time: a regression of its ratio
    assert slow.returncode == 1 and "REGRESSION test_suite.py::test_work" in slow.stdout, slow.stdout[-3000:]
    assert json.loads(saved.read_text())["ratios"] == baseline  # the failing run is not the new baseline
    again = _run(tmp_path, 1)
    assert again.returncode == 0 and "no ratio grew" in again.stdout, again.stdout[-3000:]
