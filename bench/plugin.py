"""`pytest --benchmark`: the benchmark suite, timed, saved and compared with the previous run on this machine.

- Runs every test that uses pytest-benchmark's `benchmark` fixture (bench/: backends, jobs, the machine probe),
  timed; the others are deselected. Results are saved as pytest-benchmark saves them (`.benchmarks/`, one folder
  per machine; `pytest-benchmark compare` reads them).
- Absolute times move with the machine's load and clock, so runs are compared by ratios: each benchmark's median
  divided by the median of a test named `test_machine_probe` (bench/test_machine.py: fixed interpreter work and a
  NumPy product on one thread) in the same run. The ratios are kept per machine (CPU, its decisive flags, CPUs,
  Python) beside the saved runs (`.benchmarks/ratios-<machine>.json`, or in `--benchmark-storage`); a ratio that
  grew past `--benchmark-max-regression` (default 1.5x) against the previous saved run fails the session, and the
  summary lists each one (a failing run is not saved as the new baseline).
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest

PROBE = "test_machine_probe"
SCHEMA = "vae-engine-bench-ratios/1"


def pytest_addoption(parser):
    group = parser.getgroup("vae-engine benchmark suite")
    group.addoption("--benchmark", action="store_true", dest="benchmark_suite",
                    help="Run the benchmark suite timed, save the results (.benchmarks/) and compare each benchmark's "
                         "ratio to this run's machine probe with the previous saved run on this machine.")
    group.addoption("--benchmark-max-regression", type=float, default=1.5, dest="benchmark_max_regression",
                    help="With --benchmark: fail when a ratio grew by more than this factor (default 1.5).")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("benchmark_suite", False):
        return
    root = Path(str(config.rootpath))
    config.option.benchmark_enable = True
    config.option.benchmark_disable = False
    from pytest_benchmark.utils import get_tag

    config.option.benchmark_autosave = get_tag()  # what --benchmark-autosave stores: the commit and the time
    if config.getoption("benchmark_storage", "").startswith("file://./"):  # the default: relative to the cwd
        config.option.benchmark_storage = f"file://{root / '.benchmarks'}"


def pytest_collection_modifyitems(config, items):
    if not config.getoption("benchmark_suite", False):
        return
    keep = [i for i in items if "benchmark" in getattr(i, "fixturenames", ())]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def machine_id() -> str:
    """This machine for comparisons: CPU model and decisive flags, the CPUs this process may use, Python."""
    from vae_engine.core import hardware

    text = json.dumps([hardware.cpu_info()[0], hardware.key_flags(), hardware.available_cpus(),
                       platform.python_version()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ratios(benchmarks) -> dict[str, float]:
    """Each benchmark's median over the machine probe's median in the same run."""
    medians = {b.fullname: b.stats.median for b in benchmarks if getattr(b, "stats", None) and b.stats.rounds}
    probe = next((m for name, m in medians.items() if name.endswith(PROBE)), None)
    if not probe:
        return {}
    return {name: m / probe for name, m in medians.items() if not name.endswith(PROBE)}


def compare(now: dict[str, float], before: dict[str, float], limit: float) -> list[tuple[str, float, float]]:
    """(name, previous ratio, ratio) of each benchmark whose ratio grew by more than `limit`."""
    return [(name, before[name], r) for name, r in sorted(now.items()) if name in before and r > before[name] * limit]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not config.getoption("benchmark_suite", False) or not hasattr(config, "_benchmarksession"):
        return
    now = ratios(config._benchmarksession.benchmarks)
    if not now:
        return
    from vae_engine.core import atomic

    storage = config.getoption("benchmark_storage", "")
    folder = Path(storage.removeprefix("file://")) if storage.startswith("file://") else \
        Path(str(config.rootpath)) / ".benchmarks"
    path = folder / f"ratios-{machine_id()}.json"
    try:
        before = json.loads(path.read_text())["ratios"] if path.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        before = {}
    worse = compare(now, before, config.getoption("benchmark_max_regression"))
    config._vae_engine_bench = (path, len(now), len([n for n in now if n in before]), worse)
    if not worse:  # a regressed run does not become the baseline: the next run is compared with the good one
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"schema": SCHEMA, "machine": machine_id(), "ratios": {**before, **now}})
    if worse and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    result = getattr(config, "_vae_engine_bench", None)
    if result is None:
        return
    path, n, compared, worse = result
    tr = terminalreporter
    tr.section("benchmark ratios (median / machine probe, this run vs the previous one on this machine)")
    tr.line(f"{n} ratios, {compared} compared with the previous run; " + (f"kept the previous ones in {path}"
                                                                         if worse else f"saved to {path}"))
    for name, old, new in worse:
        tr.line(f"REGRESSION {name}: {old:.3g} -> {new:.3g} ({new / old:.2f}x)", red=True)
    if compared and not worse:
        tr.line(f"no ratio grew by more than {config.getoption('benchmark_max_regression')}x", green=True)
