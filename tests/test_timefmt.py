"""Times and durations in log lines: RFC 3339, and durations as the config writes them."""

from __future__ import annotations

import calendar
import random
import time
from datetime import timedelta

import pytest

from forwarder import timefmt
from forwarder.config import parse_duration
from forwarder.timefmt import (
    TimeFormatError,
    format_duration,
    format_since,
    format_time,
    parse_time_ns,
)


def ts_of(text: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS.fffffffffZ`` -> ns, without the code under test."""
    whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return whole * 1_000_000_000 + int(text[20:29])


def parse_log_ts(text: bytes) -> int:
    """A log stream's timestamp: always 9 fraction digits."""
    return parse_time_ns(text, fraction_digits=9)


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


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-25T07:12:34.123456789Z",
        "1970-01-01T00:00:00.000000000Z",
        "1970-01-01T00:00:00.000000001Z",
        "1999-12-31T23:59:59.999999999Z",
        "2000-01-01T00:00:00.000000000Z",
        "2000-02-29T12:00:00.500000000Z",  # divisible by 400: leap
        "2024-02-29T23:59:59.999999999Z",
        "2024-03-01T00:00:00.000000000Z",
        "2023-12-31T23:59:59.999999999Z",
        "2100-02-28T23:59:59.000000000Z",
        "2100-03-01T00:00:00.000000000Z",  # 2100 is no leap year
        "2038-01-19T03:14:08.000000000Z",  # past 2**31 seconds
        "9999-12-31T23:59:59.999999999Z",
    ],
)
def test_log_timestamp_matches_timegm(text: str) -> None:
    assert parse_log_ts(text.encode()) == ts_of(text)


def test_log_timestamp_before_the_epoch() -> None:
    assert parse_log_ts(b"1969-12-31T23:59:59.999999999Z") == -1
    assert parse_log_ts(b"1900-01-01T00:00:00.000000000Z") == -2208988800 * 10**9


def test_log_timestamp_random_against_timegm() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        whole = rng.randrange(0, 253402300800)  # through 9999-12-31
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        fraction = rng.randrange(10**9)
        got = parse_log_ts(f"{text}.{fraction:09d}Z".encode())
        assert got == whole * 10**9 + fraction


def test_log_timestamp_same_second_shares_the_cache_but_not_the_fraction() -> None:
    base = ts_of("2026-11-25T07:12:34.000000000Z")
    for fraction in (0, 1, 999_999_999, 123_456_789):
        assert parse_log_ts(f"2026-11-25T07:12:34.{fraction:09d}Z".encode()) == base + fraction


def test_seconds_cache_is_bounded_and_stays_correct() -> None:
    start = ts_of("2026-01-01T00:00:00.000000000Z") // 10**9
    for second in range(start, start + 2 * timefmt._SECONDS_CACHE_MAX + 5):
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        assert parse_log_ts(f"{text}.000000042Z".encode()) == second * 10**9 + 42
        assert len(timefmt._SECONDS_CACHE) <= timefmt._SECONDS_CACHE_MAX


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-11-25T08:12:34.123456789+01:00", "2026-11-25T07:12:34.123456789Z"),
        ("2026-11-25T01:42:34.123456789-05:30", "2026-11-25T07:12:34.123456789Z"),
        ("2027-01-01T00:30:00.000000000+01:00", "2026-12-31T23:30:00.000000000Z"),
        ("2026-11-25T07:12:34.123456789+00:00", "2026-11-25T07:12:34.123456789Z"),
    ],
)
def test_log_timestamp_numeric_offset(text: str, utc: str) -> None:
    assert parse_log_ts(text.encode()) == ts_of(utc)


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"2026-11-25T07:12:34.123456789",  # no zone
        b"2026-11-25T07:12:34.12345678Z",  # 8 fraction digits
        b"2026-11-25T07:12:34.1234567890Z",
        b"2026-11-25T07:12:34,123456789Z",
        b"2026-11-25 07:12:34.123456789Z",
        b"2026-11-25t07:12:34.123456789Z",
        b"2026-11-25T07:12:34.12345678xZ",
        b"2026-11-25T07:12:34. 12345678Z",  # int() would take these three
        b"2026-11-25T07:12:34.+12345678Z",
        b"2026-11-25T07:12:34.1_2345678Z",
        b"2026-13-25T07:12:34.123456789Z",
        b"2026-00-25T07:12:34.123456789Z",
        b"2026-11-31T07:12:34.123456789Z",
        b"2026-11-00T07:12:34.123456789Z",
        b"2026-02-29T07:12:34.123456789Z",  # not a leap year
        b"1900-02-29T07:12:34.123456789Z",  # divisible by 100: not leap
        b"2026-11-25T24:00:00.000000000Z",
        b"2026-11-25T07:60:34.123456789Z",
        b"2026-11-25T07:12:60.000000000Z",  # leap second: Go's parser refuses it too
        b"2026-11-25T07:12:34.123456789+24:00",
        b"2026-11-25T07:12:34.123456789+01-00",
        b"2026-11-25T07:12:34.123456789Y",
        b"+026-11-25T07:12:34.123456789Z",
    ],
)
def test_log_timestamp_rejects_junk(junk: bytes) -> None:
    with pytest.raises(TimeFormatError, match="timestamp"):
        parse_log_ts(junk)


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-11-25T07:12:34.123456789Z", "2026-11-25T07:12:34.123456789Z"),
        ("2026-11-25T07:12:34.5Z", "2026-11-25T07:12:34.500000000Z"),
        ("2026-11-25T07:12:34.1234Z", "2026-11-25T07:12:34.123400000Z"),
        ("2026-11-25T07:12:34Z", "2026-11-25T07:12:34.000000000Z"),
        ("2026-11-25T08:12:34.1234+01:00", "2026-11-25T07:12:34.123400000Z"),
        ("2026-11-25T08:17:39.5+01:00", "2026-11-25T07:17:39.500000000Z"),
        ("2026-11-25T02:12:34-05:00", "2026-11-25T07:12:34.000000000Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000000000Z"),
    ],
)
def test_any_fraction_length_as_go_writes_rfc3339nano(text: str, utc: str) -> None:
    expected = ts_of(utc) if not utc.startswith("0001") else -62135596800 * 10**9
    assert parse_time_ns(text) == expected
    assert parse_time_ns(text.encode()) == expected


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "yesterday",
        "2026-11-25 07:17:39Z",
        "2026-11-25T07:17:39.Z",
        "2026-11-25T07:17:39.1234567890Z",
        "2026-11-25T07:17:39",
        "2026-11-25T07:17:39.5",
        "2026-11-25T07:17:39.5+0100",
        "2026-11-25T07:17:39Zjunk",
        "2026-11-25T07:17:39é",
    ],
)
def test_any_form_rejects_junk(junk: str) -> None:
    with pytest.raises(TimeFormatError, match="timestamp"):
        parse_time_ns(junk)


def test_log_timestamps_need_nine_fraction_digits() -> None:
    with pytest.raises(TimeFormatError):
        parse_log_ts(b"2026-11-25T08:12:34.1234+01:00")  # 30 bytes, as long as the 'Z' form
    assert parse_time_ns(b"2026-11-25T08:12:34.1234+01:00") == ts_of(
        "2026-11-25T07:12:34.123400000Z"
    )


def test_since_is_seconds_dot_nanoseconds() -> None:
    assert format_since(ts_of("2026-11-25T07:12:34.000000042Z")) == "1795590754.000000042"
    assert format_since(1_000_000_000) == "1.000000000"
    assert format_since(0) == "0.000000000"
