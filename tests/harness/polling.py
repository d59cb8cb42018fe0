"""Deadline-bounded polling: the only way the harness waits for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str | Callable[[], str] = "a condition",
    first_interval: float = 0.01,
    max_interval: float = 0.2,
) -> T:
    """Call ``probe`` until it returns something truthy, and return that; raise at the deadline.

    The interval between probes starts at ``first_interval`` and doubles up to ``max_interval``,
    so fast conditions are noticed fast and slow ones don't spin. ``what`` (or a callable giving
    it, for details only known at the deadline) is put in the ``TimeoutError`` message.
    """
    deadline = time.monotonic() + timeout
    interval = first_interval
    while True:
        result = probe()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {detail}")
        time.sleep(min(interval, remaining))
        interval = min(interval * 2, max_interval)
