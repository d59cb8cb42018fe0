"""How log lines print times and durations: RFC 3339 and the config's own duration form."""

from __future__ import annotations

import time
from datetime import timedelta

_UNITS_MS = ((3_600_000, "h"), (60_000, "m"), (1000, "s"))


def format_time(ts_ns: int) -> str:
    """An RFC 3339 time in UTC, with nanoseconds when it has any:
    ``2026-11-29T23:31:22.093859350Z``, ``2026-11-29T23:31:22Z``."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{ns:09d}Z" if ns else f"{whole}Z"


def format_duration(value: timedelta | float) -> str:
    """A duration as the config writes it (``10s``, ``250ms``, ``2m``, ``1h``, ``1.5s``), to
    the microsecond; ``value`` is a timedelta or seconds. The config reads it back as is."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    ms = round(seconds * 1000, 3)
    if ms == int(ms) and ms:
        for unit_ms, unit in _UNITS_MS:
            if ms % unit_ms == 0:
                return f"{int(ms) // unit_ms}{unit}"
    if ms < 1000:
        return f"{ms:.3f}".rstrip("0").rstrip(".") + "ms" if ms else "0s"
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
