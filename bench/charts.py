"""Draw the benchmark charts the docs show from their saved JSON (no measurement here): the server under load
and the anomaly detectors side by side. `python bench/charts.py` rewrites bench/results/load_test.png and
bench/results/detect_bench.png."""

from __future__ import annotations

import json
from pathlib import Path

from vae_engine.core.figures import detector_chart, load_chart

RESULTS = Path(__file__).resolve().parent / "results"
CHARTS = {  # chart -> (its JSON, how it is drawn)
    "load_test.png": ("load_test.json", load_chart),
    "detect_bench.png": ("detect_bench.json", detector_chart),
}


def draw(results: Path = RESULTS, out: Path = RESULTS) -> list[Path]:
    written = []
    for png, (data, chart) in CHARTS.items():
        chart(json.loads((results / data).read_text()), out / png)
        written.append(out / png)
    return written


if __name__ == "__main__":
    for path in draw():
        print(f"wrote {path}")
