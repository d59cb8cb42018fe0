"""Exponential backoff with jitter, shared by every retry loop (sources and output)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(
    first_s: float, max_s: float, *, rng: random.Random | None = None
) -> Iterator[float]:
    """Exponential backoff with jitter on the upper half: first, 2*first, ... max.

    Each delay is drawn from [d/2, d], so that many collectors restarted together don't
    reconnect in step, while the wait still grows."""
    rand = rng or random.Random()
    delay = first_s
    while True:
        yield rand.uniform(delay / 2, delay)
        delay = min(delay * 2, max_s)
