"""Times and durations in log lines: RFC 3339, and durations as the config writes them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from forwarder.config import parse_duration
from forwarder.timefmt import format_duration, format_time


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (10, "10s"),
        (0.25, "250ms"),
        (120, "2m"),
        (3600, "1h"),
        (90, "90s"),
        (1.5, "1.5s"),
        (12.3456789, "12.345679s"),
        (0.0125, "12.5ms"),
        (0, "0s"),
        (timedelta(seconds=10), "10s"),
        (timedelta(milliseconds=250), "250ms"),
    ],
)
def test_durations_print_in_the_configs_form(seconds: float | timedelta, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", ["10s", "250ms", "2m", "1h", "1.5s", "90s", "12.5ms", "0s"])
def test_a_printed_duration_reads_back_as_the_same_value(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


def test_times_print_as_rfc3339_utc_with_their_nanoseconds() -> None:
    assert format_time(1_795_989_450_093_859_350) == "2026-11-29T21:57:30.093859350Z"
    assert format_time(1_795_989_450_000_000_001) == "2026-11-29T21:57:30.000000001Z"
    assert format_time(1_795_989_450_000_000_000) == "2026-11-29T21:57:30Z"
