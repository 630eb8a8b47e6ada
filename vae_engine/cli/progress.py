"""Progress bars for anything that takes more than a second (rich, on stderr), and the consoles commands print to.

rich costs ~20 ms to import, a tenth of a short job's whole command: a console makes its rich Console on first use
(a plain line is written directly), and a job's bar and status appear only once the work has lasted
`SHOW_AFTER` seconds (or reports progress), so a job that ends sooner never imports rich."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..perf.fraction import percent
from ..training.callbacks import Callbacks

if TYPE_CHECKING:
    from rich.progress import Progress

SHOW_AFTER = 0.5  # seconds of work before a job's bar appears


class LazyConsole:
    """rich's Console, made on first use; one plain line (no markup, no options) is written without it."""

    def __init__(self, stderr: bool):
        self.stderr, self._rich = stderr, None

    @property
    def rich(self):
        if self._rich is None:
            from rich.console import Console

            self._rich = Console(stderr=self.stderr)
        return self._rich

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self._rich is None and not kwargs and len(objects) == 1 and isinstance(objects[0], str) \
                and "[" not in objects[0]:
            stream = sys.stderr if self.stderr else sys.stdout
            stream.write(objects[0] + "\n")
            stream.flush()
            return
        self.rich.print(*objects, **kwargs)

    def __getattr__(self, name: str) -> Any:  # status, width, ...: rich's own
        return getattr(self.rich, name)


CONSOLE = LazyConsole(stderr=True)  # progress, status and warnings
OUT = LazyConsole(stderr=False)  # what a command reports: stdout


def progress_bar(unit: str = "items") -> Progress:
    """A rich progress bar with count, rate and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TextColumn(f"{{task.fields[rate]}} {unit}/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=CONSOLE.rich, transient=True,
    )


class Later:
    """Draw something once work has lasted SHOW_AFTER seconds: `show` runs once, from a timer thread then, or at
    once on `now()`; never after `end()`. `end()` says whether it was shown (to stop what it drew)."""

    def __init__(self, show: Callable[[], None]):
        self.show, self.lock, self.state = show, threading.Lock(), "waiting"
        self.timer = threading.Timer(SHOW_AFTER, self.now)
        self.timer.daemon = True
        self.timer.start()

    def now(self) -> bool:
        with self.lock:
            if self.state == "waiting":
                self.show()
                self.state = "shown"
            return self.state == "shown"

    def end(self) -> bool:
        self.timer.cancel()
        with self.lock:  # a timer already running has finished showing, or shows nothing now
            shown, self.state = self.state == "shown", "over"
        return shown


@contextlib.contextmanager
def lazy_status(text: str) -> Iterator[Any]:
    """rich's status spinner with `text`, shown on the first `update` (work worth watching, e.g. measuring) or
    after SHOW_AFTER seconds; a step that ends sooner shows nothing."""
    spinner: list = []
    later = Later(lambda: spinner.append(CONSOLE.status(text)) or spinner[0].start())

    class Status:
        def update(self, message: str) -> None:
            if later.now():
                spinner[0].update(message)

    try:
        yield Status()
    finally:
        if later.end():
            spinner[0].stop()


class Meter:
    """A job's progress bar: it appears once work has gone on for SHOW_AFTER seconds (so errors found while loading
    print alone, and a job that ends sooner draws nothing)."""

    def __init__(self, description: str, unit: str = "items", info: str = ""):
        self.description, self.unit, self.info = description, unit, info
        self.bar: Progress | None = None
        self.total: int | None = None
        self.t0, self.done, self.later = 0.0, 0, None

    def start(self, total: int | None) -> None:
        self.total, self.t0, self.done = total, time.perf_counter(), 0
        self.later = Later(self._show)

    def _show(self) -> None:
        bar = progress_bar(self.unit)
        bar.start()
        self.task = bar.add_task(self.description, total=self.total, info=self.info, rate="", completed=self.done)
        self.bar = bar  # last: another thread that sees the bar finds its task

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is None and self.later is not None and time.perf_counter() - self.t0 >= SHOW_AFTER:
            self.later.now()
        if self.bar is not None:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.1f}")

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        if self.later is not None and self.later.end():
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
