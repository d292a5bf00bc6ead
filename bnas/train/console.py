"""What a training run shows and hears: the progress bar or log lines, and Ctrl-C.

Progress goes to a tqdm bar on a terminal; elsewhere (a log file, a pipe) it is ``logging``
records at INFO on ``bnas.train.console``, one per epoch and one a minute inside long epochs.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any, final

__all__ = ["InterruptGuard", "Progress", "duration", "saved_on_interrupt"]

logger = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A tqdm bar per epoch on a terminal; plain log lines otherwise (one per epoch, and
    one a minute inside long epochs)."""

    LOG_EVERY_S = 60.0

    def __init__(self, total_epochs: int, steps: int, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.steps = steps
        self.total_epochs = total_epochs
        self.bar: Any = None
        self.last_log = 0.0

    def start_epoch(self, epoch: int, done_steps: int) -> None:
        self.last_log = time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps,
                initial=done_steps,
                desc=f"epoch {epoch + 1}/{self.total_epochs}",
                leave=False,
                file=sys.stderr,
                unit="step",
                dynamic_ncols=True,
            )

    def step(self, epoch: int, step: int, loss: float, acc: float, rate: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss {loss:.4f}, acc {acc:.3f}, {rate:.0f} samples/s, run ETA {duration(eta_s)}", refresh=False
            )
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last_log >= self.LOG_EVERY_S:
            self.last_log = time.perf_counter()
            logger.info(
                "epoch %d/%d  step %d/%d  loss %.4f  acc %.4f  %.0f samples/s  ETA %s",
                epoch + 1,
                self.total_epochs,
                step,
                self.steps,
                loss,
                acc,
                rate,
                duration(eta_s),
            )

    def end_epoch(self, epoch: int, row: Mapping[str, float], eta_s: float) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            logger.info(
                "epoch %d/%d  loss %.4f  train acc %.4f  val acc %.4f  lr %.2e  %.0f samples/s  %.1f s  ETA %s",
                epoch + 1,
                self.total_epochs,
                row["train_loss"],
                row["train_acc"],
                row["val_acc"],
                row["lr"],
                row["samples_per_s"],
                row["epoch_time_s"],
                duration(eta_s),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@final
class InterruptGuard:
    """Turns the first Ctrl-C into a request that the loop honours between two steps, so the
    checkpoint it writes is a consistent state (never half an optimiser step). A second
    Ctrl-C interrupts at once. Only the main thread can own signal handlers; elsewhere the
    guard does nothing and a KeyboardInterrupt arrives wherever it arrives."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a Ctrl-C came since the last check."""
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


@contextmanager
def saved_on_interrupt(
    progress: Progress, save: Callable[[], None] | None, saved: Callable[[], str]
) -> Iterator[InterruptGuard]:
    """Run a training loop under an ``InterruptGuard``; on Ctrl-C, ``save()`` the exact
    position (the guard only stops between two steps) and log ``saved()`` (what was saved
    where) with how to go on, then re-raise: the caller (the CLI) says "interrupted". The
    progress bar is closed either way."""
    guard = InterruptGuard()
    try:
        with guard:
            yield guard
    except KeyboardInterrupt:
        progress.close()
        if save is not None:
            save()
            logger.warning("%s; rerun with --resume to continue", saved())
        raise
    finally:
        progress.close()
