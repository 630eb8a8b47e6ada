"""The hooks a training run calls (no torch here: the CLI's progress bar subclasses them at start-up)."""

from __future__ import annotations

from typing import Any


class Callbacks:
    """Hooks the trainer calls; the CLI subclasses it for progress bars (the trainer knows nothing of rich)."""

    def on_train_start(self, epochs: int, start_epoch: int, steps_per_epoch: int) -> None: ...
    def on_batch_end(self, epoch: int, step: int, loss: float, samples: int) -> None: ...
    def on_epoch_end(self, row: dict[str, Any]) -> None: ...
    def on_message(self, text: str) -> None: ...
