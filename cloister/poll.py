"""The one deadline-and-backoff helper behind every wait in cloister.

A wait polls something (instances' states, SSH, a worker's port), sleeps a growing delay between
polls, and gives up at a deadline with a message naming what it waited for. ``Backoff`` keeps the
deadline and the delay; ``retry`` calls something until it stops failing with a transient error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """A deadline ``timeout`` seconds from now and a delay that grows by ``factor`` up to ``maximum``."""

    def __init__(self, timeout: float, *, initial: float = 0.05, maximum: float = 5.0, factor: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.timeout = timeout
        self.delay = initial
        self.maximum = maximum
        self.factor = factor
        self._sleep = sleep
        self._clock = clock
        self.deadline = clock() + timeout

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - self._clock())

    def expired(self) -> bool:
        return self._clock() >= self.deadline

    def wait(self) -> bool:
        """Sleep the next delay and return True; return False at once if that would pass the deadline."""
        if self._clock() + self.delay > self.deadline:
            return False
        self._sleep(self.delay)
        self.delay = min(self.delay * self.factor, self.maximum)
        return True


def retry(call: Callable[[], T], *, transient: Callable[[Exception], bool], timeout: float,
          initial: float = 0.5, maximum: float = 10.0, factor: float = 2.0) -> T:
    """Call until it returns; retry while it raises an error ``transient`` accepts and time is left."""
    backoff = Backoff(timeout, initial=initial, maximum=maximum, factor=factor)
    while True:
        try:
            return call()
        except Exception as exc:
            if not transient(exc) or not backoff.wait():
                raise
