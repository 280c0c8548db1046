"""Long work is written as generators that yield progress; this runs one to its end."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

Result = TypeVar("Result")


def drive(steps: Generator[Any, None, Result], callback: Callable[[Any], None] | None = None) -> Result:
    """Exhaust `steps`, handing each yielded item to `callback`; return the generator's result."""
    while True:
        try:
            item = next(steps)
        except StopIteration as finished:
            return finished.value
        if callback is not None:
            callback(item)
