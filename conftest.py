"""The repository's pytest set-up: `pytest --benchmark` (bench/plugin.py) is known wherever pytest starts here."""

pytest_plugins = ["bench.plugin"]
