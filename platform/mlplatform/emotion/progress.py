"""The progress line an emotion training prints from rank 0: epoch, batch, loss, dev macro-F1 (or another score) and samples/s."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    """Prints one line at most every ``interval_s`` seconds within an epoch, and one at each epoch's end.

    Plain lines rather than a redrawn bar: the loop runs in a Ray worker, whose output reaches the
    driver's terminal line by line, prefixed with the worker's name.

    Args:
        epochs: the run's epochs.
        batches: batches per epoch on this worker.
        interval_s: seconds between lines within an epoch; 0 prints nothing at all.
        score_name: what the score given at each epoch's end is.
        out: where the lines go (stdout).
    """

    def __init__(self, *, epochs: int, batches: int, interval_s: float, score_name: str = "dev macro-F1",
                 out: TextIO | None = None) -> None:
        self.epochs, self.batches, self.interval_s, self.score_name = epochs, batches, interval_s, score_name
        self.out = out or sys.stdout
        self.score: float | None = None
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_started = self._last_line = time.perf_counter()
        self._loss_sum, self._samples = 0.0, 0

    def batch_done(self, epoch: int, batch: int, loss: float, samples: int) -> None:
        """Count one batch (``batch`` from 1) of ``samples`` texts; print if ``interval_s`` has passed."""
        self._loss_sum += loss * samples
        self._samples += samples
        now = time.perf_counter()
        if self.interval_s > 0 and now - self._last_line >= self.interval_s and batch < self.batches:
            self._last_line = now
            self._print(epoch, batch, now)

    def epoch_done(self, epoch: int, score: float) -> None:
        """The epoch's closing line, with its score; the next epoch's counts start from zero."""
        self.score = score
        if self.interval_s > 0:
            self._print(epoch, self.batches, time.perf_counter())
        self._start_epoch()

    def _print(self, epoch: int, batch: int, now: float) -> None:
        loss = self._loss_sum / max(self._samples, 1)
        rate = self._samples / max(now - self._epoch_started, 1e-9)
        score = f"{self.score:.3f}" if self.score is not None else "-"
        print(f"epoch {epoch}/{self.epochs} · batch {batch}/{self.batches} · loss {loss:.4f} · "
              f"{self.score_name} {score} · {rate:.0f} samples/s", file=self.out, flush=True)
