"""Long work: generators that yield progress, one cancel token per job, and their timing.

A job (a fit, a prediction) gets its own `threading.Event` when it starts. Whoever wants it
stopped sets the event; the code doing the work only reads it, never clears it, so a Stop
that arrives in any phase (loading the data, training, the closing fits, predicting) is seen
by every phase after it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

Result = TypeVar("Result")


class Cancelled(RuntimeError):
    """A job stopped by its cancel token."""


class FitCancelled(Cancelled):
    """A fit stopped before it had weights to keep; the previous model is unchanged."""


class PredictionCancelled(Cancelled):
    """Raised by predict when cancel() stopped it; planes already written stay written."""


def raise_if_cancelled(cancel: threading.Event | None, error: type[Cancelled], what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise error(f"{what} stopped by cancel()")


class CancellableArray:
    """A read-only view of an array whose every read first checks a cancel token, so that
    loading and analysing a large stack (read plane by plane) stops at the next plane."""

    def __init__(self, data, cancel: threading.Event, error: type[Cancelled] = FitCancelled) -> None:
        self._data = data
        self._cancel = cancel
        self._error = error
        self.shape = tuple(data.shape)
        self.dtype = data.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        raise_if_cancelled(self._cancel, self._error, "reading the data")
        return self._data[key]


@dataclasses.dataclass
class Stops:
    """How a user's Stop (a button, Ctrl-C) reaches a job. While a fit trains, the first Stop
    ends the training and the fit completes its model with the best weights reached (seconds);
    any other Stop cancels the job, within a second."""

    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    stop_training: threading.Event = dataclasses.field(default_factory=threading.Event)
    training: bool = False  # kept up to date from the fit's progress

    def follow(self, item: Any) -> None:
        """Track from a progress item (or a job's progress of one) whether the training is still running."""
        item = getattr(item, "step", item)
        fraction = getattr(item, "fraction", None)
        self.training = hasattr(item, "iteration") and fraction is not None and fraction < 1

    def stop(self) -> str:
        """Apply one Stop; returns "training" (the training ends) or "job" (the job is cancelled)."""
        if self.training and not self.stop_training.is_set():
            self.stop_training.set()
            return "training"
        self.cancel.set()
        return "job"


def drive(steps: Generator[Any, None, Result], callback: Callable[[Any], None] | None = None) -> Result:
    """Exhaust `steps`, handing each yielded item to `callback`; return the generator's result."""
    while True:
        try:
            item = next(steps)
        except StopIteration as finished:
            return finished.value
        if callback is not None:
            callback(item)


def remaining_seconds(elapsed: float, fraction: float) -> float | None:
    """The time left at this rate, or None before any progress."""
    return max(elapsed * (1 - fraction) / fraction, 0.0) if fraction > 0 else None


def format_seconds(seconds: float | None) -> str:
    """'1h02m03s', '2m05s', or '?' for an unknown duration."""
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
