"""Times as the engine writes them and as log lines print them.

- :func:`parse_time_ns`: the one RFC 3339 parser, to the nanosecond, without ``datetime``
  (log timestamps, inspect's ``StartedAt``/``FinishedAt``, a stats sample's ``read``).
- :func:`format_since`: the engine's ``since`` parameter (``/logs``, ``/events``).
- :func:`format_time` and :func:`format_duration`: how our own log lines print them.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Final

__all__ = [
    "TimeFormatError",
    "format_duration",
    "format_since",
    "format_time",
    "parse_time_ns",
]

_UNITS_MS = ((3_600_000, "h"), (60_000, "m"), (1000, "s"))

_PREFIX_RE = re.compile(rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)")
_DAYS_IN_MONTH: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_SECONDS_CACHE: dict[bytes, int] = {}
_SECONDS_CACHE_MAX: Final = 4096  # one entry per distinct second; replays walk forward
_SHOW_BYTES: Final = 40


class TimeFormatError(ValueError):
    """Text that is not an RFC 3339 time: the fault of whoever sent it (callers name it)."""


def _show(text: bytes) -> str:
    return repr(text[:_SHOW_BYTES]) + ("..." if len(text) > _SHOW_BYTES else "")


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _seconds_ns(prefix: bytes) -> int:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) -> nanoseconds since the epoch, cached per second."""
    cached = _SECONDS_CACHE.get(prefix)
    if cached is not None:
        return cached
    m = _PREFIX_RE.fullmatch(prefix)
    if m is None:
        raise TimeFormatError(f"bad timestamp: {_show(prefix)}")
    year, month, day, hour, minute, second = map(int, m.groups())
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    # Second 60 is refused like Go's time.Parse does: the engine can't have written it.
    if not (
        1 <= month <= 12
        and 1 <= day <= _DAYS_IN_MONTH[month] + (month == 2 and leap)
        and hour <= 23
        and minute <= 59
        and second <= 59
    ):
        raise TimeFormatError(f"timestamp out of range: {_show(prefix)}")
    days = _days_from_civil(year, month, day)
    value = ((days * 24 + hour) * 60 + minute) * 60 + second
    if len(_SECONDS_CACHE) >= _SECONDS_CACHE_MAX:
        _SECONDS_CACHE.clear()
    _SECONDS_CACHE[prefix] = value * 1_000_000_000
    return value * 1_000_000_000


def parse_time_ns(text: bytes | str, *, fraction_digits: int | None = None) -> int:
    """An RFC 3339 time -> nanoseconds since the epoch.

    ``YYYY-MM-DDTHH:MM:SS[.f]`` then ``Z`` or ``+HH:MM``/``-HH:MM``; the fraction has 1 to 9
    digits (Go's RFC3339Nano drops trailing zeros), or exactly ``fraction_digits`` when
    given (the engine's log timestamps always carry 9: ``2026-11-25T07:12:34.123456789Z``).
    Raises :class:`TimeFormatError` on anything else.
    """
    ts = text.encode("ascii", "replace") if isinstance(text, str) else text
    # The engine's own form first: 9 digits and 'Z', the one a log stream carries.
    n = len(ts)
    if n == 30 and ts[29] == 0x5A and ts[19] == 0x2E and fraction_digits in (9, None):
        fraction = ts[20:29]
        if fraction.isdigit():
            return _seconds_ns(bytes(ts[:19])) + int(fraction)
        raise TimeFormatError(f"bad timestamp: {_show(ts)}")
    end = 19
    if n > 19 and ts[19] == 0x2E:
        end = 20
        while end < n and 0x30 <= ts[end] <= 0x39:
            end += 1
    digits = end - 20 if end > 19 else 0
    if (
        (fraction_digits is not None and digits != fraction_digits)
        or (end > 19 and not 1 <= digits <= 9)
        or n <= end
    ):
        raise TimeFormatError(f"bad timestamp: {_show(ts)}")
    offset_ns = 0
    if n - end == 1 and ts[end] == 0x5A:
        pass
    elif n - end == 6 and ts[end] in b"+-" and ts[end + 3] == 0x3A:
        hours, minutes = ts[end + 1 : end + 3], ts[end + 4 : end + 6]
        if not (hours.isdigit() and minutes.isdigit()) or int(hours) > 23 or int(minutes) > 59:
            raise TimeFormatError(f"bad timestamp offset: {_show(ts)}")
        offset_ns = (int(hours) * 3600 + int(minutes) * 60) * 1_000_000_000
        if ts[end] == 0x2D:
            offset_ns = -offset_ns
    else:
        raise TimeFormatError(f"bad timestamp: {_show(ts)}")
    ns = int(bytes(ts[20:end]).ljust(9, b"0")) if digits else 0
    return _seconds_ns(bytes(ts[:19])) - offset_ns + ns


def format_since(ts_ns: int) -> str:
    """The engine's ``since`` value for ``ts_ns`` (``seconds.nanoseconds``; inclusive)."""
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    return f"{seconds}.{ns:09d}"


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
