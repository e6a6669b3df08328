"""Clean-up that Ctrl-C cannot cut short.

The first Ctrl-C stops a task and sets off its clean-up (ending machines, killing a run's processes);
a second one, pressed because the clean-up takes a moment, must not stop that clean-up halfway and
leave behind what the task then says it ended. ``shielded`` holds SIGINT while a clean-up runs and
says, once per process, on the ``cloister`` logger, that it is cleaning up.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("cloister")
NOTICE = "cleaning up, please wait"

_state = {"depth": 0, "noticed": False}


def _held(signum, frame) -> None:
    if not _state["noticed"]:
        _state["noticed"] = True
        try:
            log.warning(NOTICE)
        except Exception:  # noqa: BLE001 - a notice that cannot be written must not stop the clean-up
            pass


@contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT until the block has finished (main thread only; nested blocks share the outer one)."""
    if _state["depth"]:
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
        return
    try:
        previous = signal.signal(signal.SIGINT, _held)
    except ValueError:  # not the main thread: signals reach only the main thread anyway
        yield
        return
    _state["depth"] = 1
    try:
        yield
    finally:
        _state["depth"] = 0
        signal.signal(signal.SIGINT, previous)
