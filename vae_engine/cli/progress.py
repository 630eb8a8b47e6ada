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

from ..perf.fraction import percent
from ..training.callbacks import Callbacks

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


class TrainingBar(Callbacks):
    """The trainer's progress: a bar over the run's steps (samples/s), one line per epoch with its numbers."""

    def on_train_start(self, epochs, start_epoch, steps_per_epoch):
        self.steps, self.bar = steps_per_epoch, progress_bar("samples")
        self.bar.start()
        self.task = self.bar.add_task("train", total=(epochs - start_epoch) * steps_per_epoch, info="", rate="")
        self.t0, self.seen = time.perf_counter(), 0

    def on_batch_end(self, epoch, step, loss, samples):
        self.seen += samples
        if (step + 1) % 25 == 0 or step == self.steps - 1:
            rate = self.seen / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=step % 25 + 1, description=f"epoch {epoch + 1}",
                            info=f"loss {loss:7.2f}", rate=f"{rate:,.0f}")

    def on_message(self, text):
        CONSOLE.print(text)

    def on_epoch_end(self, row):
        nll = f"  NLL(k=1000) {row['test_nll_k1000']:.2f}" if "test_nll_k1000" in row else ""
        self.bar.console.print(
            f"epoch {row['epoch']:3d}  train {row['train_loss']:8.3f}  test -ELBO {row['test_nelbo']:8.3f}{nll}  "
            f"{row['seconds']:6.2f} s  {row['samples_per_s']:,.0f} samples/s  {row['precision']} "
            f"{'' if row['device'] == 'cpu' else row['device'] + ' '}"
            f"{row['gflops']:,.0f} GFLOP/s" + (f" ({percent(row['fraction_of_peak'])} of peak)"
                                               if row.get("fraction_of_peak") else ""))
