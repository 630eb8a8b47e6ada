"""Progress bars for anything that takes more than a second (rich, on stderr)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

CONSOLE = Console(stderr=True)  # progress, status and warnings
OUT = Console()  # what a command reports: stdout


def progress_bar(unit: str = "items") -> Progress:
    """A rich progress bar with count, rate and time left."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TextColumn(f"{{task.fields[rate]}} {unit}/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=CONSOLE, transient=True,
    )


class Meter:
    """A progress bar that appears only once work starts, so errors found while loading print alone."""

    def __init__(self, description: str, unit: str = "items", info: str = ""):
        self.description, self.unit, self.info = description, unit, info
        self.bar: Progress | None = None

    def start(self, total: int | None) -> None:
        self.bar = progress_bar(self.unit)
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=total, info=self.info, rate="")
        self.t0, self.done = time.perf_counter(), 0

    def advance(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=n, rate=f"{rate:,.1f}")

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
