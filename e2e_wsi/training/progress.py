"""Training progress as plain lines, for logs: ``make demo > log`` or a batch job's output file.

Lightning's progress bar redraws one terminal line; written to a file or a pipe it shows nothing useful
until the end. :class:`PlainProgress` prints a line every ``every_n_steps`` optimizer steps (or at least
every ``every_seconds``) and one per epoch with the logged metrics, flushed at once. ``fit`` adds it when
standard output is not a terminal (:func:`wants_plain_progress`).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback


def wants_plain_progress(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is a file or a pipe rather than a terminal."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress(Callback):
    """Periodic plain-text lines with epoch, step, loss and elapsed time (rank 0 only).

    Args:
        every_n_steps: Print after every this many training batches.
        every_seconds: Also print when this long has passed since the last line (slow steps).
        stream: Where to print (default: stdout at print time).
    """

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 60.0, stream: TextIO | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.stream = stream
        self._start = self._last = 0.0

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(f"e2e-wsi fit: {text}", file=self.stream or sys.stdout, flush=True)
            self._last = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        self._print(trainer, f"training for {epochs} epoch(s), {_batches(trainer)} batch(es) per epoch")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = batch_idx + 1
        due = step % self.every_n_steps == 0 or time.monotonic() - self._last >= self.every_seconds
        if not due:
            return
        loss = _loss(outputs)
        self._print(
            trainer,
            f"epoch {trainer.current_epoch + 1} batch {step}/{_batches(trainer)} step {trainer.global_step}"
            f" loss {loss:.4f} elapsed {_elapsed(time.monotonic() - self._start)}",
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        }
        shown = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not math.isnan(v))
        self._print(
            trainer,
            f"epoch {trainer.current_epoch + 1} done, elapsed {_elapsed(time.monotonic() - self._start)}"
            + (f": {shown}" if shown else ""),
        )


def _batches(trainer: L.Trainer) -> str:
    total = trainer.num_training_batches
    return str(int(total)) if isinstance(total, (int, float)) and math.isfinite(total) else "?"


def _loss(outputs: Any) -> float:
    """The training step's loss: a tensor, or the ``loss`` of a dict; NaN when there is none."""
    value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
