"""JsonFileParser on json-file logs recorded from Engine 20.10 (tests/data/jsonfile/)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from forwarder.docker.frames import EngineStreamError, PartialJoiner
from forwarder.docker.jsonfile import MAX_ENTRY_BYTES, JsonFileParser, parse_json_time
from forwarder.records import LogLine, RawLine

DATA = Path(__file__).parent / "data" / "jsonfile"
MIXED = (DATA / "mixed" / "c-json.log").read_bytes()


def parse_all(data: bytes, *sizes: int, tty: bool = False) -> tuple[list[RawLine], int]:
    """Feed ``data`` cut at ``sizes`` (then the rest); all lines and the final offset."""
    parser = JsonFileParser(tty=tty)
    lines: list[RawLine] = []
    start = 0
    for size in [*sizes, len(data)]:
        chunk = parser.feed(data[start : start + size] if size != len(data) else data[start:])
        assert not chunk.garbled
        lines += chunk.lines
        start = min(start + size, len(data))
    return lines, parser.offset


def test_mixed_recording_whole() -> None:
    lines, offset = parse_all(MIXED)
    assert offset == len(MIXED)
    assert [(line.source, line.partial, len(line.data)) for line in lines] == [
        ("stdout", False, 5),
        ("stdout", True, 16384),
        ("stdout", True, 16384),
        ("stdout", False, 40000 - 2 * 16384),
        ("stdout", False, len("bad \ufffd\ufffd utf8".encode())),
        ("stdout", False, len('ctl \x01\t<&>"\\ \u2028 end'.encode())),
        ("stderr", False, 5),
        ("stderr", False, 5),
        ("stdout", True, len("tail-without-newline")),
    ]
    assert lines[0].data == b"first"
    # Invalid UTF-8 was replaced by the engine, one U+FFFD per byte; escapes come back as is.
    assert lines[4].data == "bad \ufffd\ufffd utf8".encode()
    assert lines[5].data == 'ctl \x01\t<&>"\\ \u2028 end'.encode()
    assert lines[0].ts_ns == parse_json_time("2026-11-29T23:51:51.674470083Z")
    # Pieces of one line carry its first piece's time.
    assert lines[1].ts_ns == lines[2].ts_ns == lines[3].ts_ns


def test_mixed_recording_attrs() -> None:
    parser = JsonFileParser()
    parser.feed(MIXED)
    assert parser.attrs == {"MODE": "x", "team": "a"}


def test_partials_join_as_for_the_api_source() -> None:
    lines, _ = parse_all(MIXED)
    joined = PartialJoiner(1 << 20).feed(lines)
    assert [line.text for line in joined][:3] == ["first", "a" * 40000, "bad \ufffd\ufffd utf8"]
    assert joined[-1] == LogLine("stdout", lines[-1].ts_ns, "tail-without-newline")


@pytest.mark.parametrize("step", [1, 7, 100, 16384])
def test_every_split_point_gives_the_same_lines(step: int) -> None:
    whole, _ = parse_all(MIXED)
    for cut in range(0, len(MIXED), step):
        assert parse_all(MIXED, cut) == (whole, len(MIXED)), cut


def test_every_split_point_small_file() -> None:
    data = (DATA / "rotated" / "c-json.log").read_bytes()
    whole, _ = parse_all(data)
    assert len(whole) > 5
    for a in range(len(data)):
        for b in (1, 50, 300):
            assert parse_all(data, a, b) == (whole, len(data)), (a, b)


def test_offset_stops_before_an_incomplete_line() -> None:
    parser = JsonFileParser(offset=1000)
    first_line_end = MIXED.index(b"\n") + 1
    chunk = parser.feed(MIXED[: first_line_end + 10])
    assert len(chunk.lines) == 1
    assert chunk.end_offset == parser.offset == 1000 + first_line_end
    assert parser.pending_bytes == 10


def test_garbage_between_good_lines_is_reported_with_its_offset() -> None:
    good = MIXED.splitlines(keepends=True)
    bad_lines = [
        b"not json at all\n",
        b'{"log":"x\\n","stream":"stdout"}\n',  # no time
        b'{"log":"x\\n","stream":"stdout","time":"yesterday"}\n',
        b'{"log":"x\\n","stream":"stdin","time":"2026-11-29T23:51:51Z"}\n',
        b'{"log":"\xff\\n","stream":"stdout","time":"2026-11-29T23:51:51Z"}\n',
    ]
    data = good[0] + b"".join(bad_lines) + good[4] + good[5]
    parser = JsonFileParser()
    chunk = parser.feed(data)
    assert [line.data for line in chunk.lines] == [
        b"first",
        lines_text(good[4]),
        lines_text(good[5]),
    ]
    offsets = [g.offset for g in chunk.garbled]
    expected, at = [], len(good[0])
    for bad in bad_lines:
        expected.append(at)
        at += len(bad)
    assert offsets == expected
    assert chunk.end_offset == len(data)


def lines_text(line: bytes) -> bytes:
    parsed = JsonFileParser().feed(line).lines
    assert len(parsed) == 1
    return parsed[0].data


def test_invalid_utf8_and_lone_surrogates_are_garbled_not_fatal() -> None:
    data = (
        b'{"log":"ok\\n","stream":"stdout","time":"2026-11-29T23:51:51.1Z"}\n'
        b'{"log":"\\ud800\\n","stream":"stdout","time":"2026-11-29T23:51:51.2Z"}\n'
        b'{"log":"ok2\\n","stream":"stderr","time":"2026-11-29T23:51:51.3Z"}\n'
    )
    chunk = JsonFileParser().feed(data)
    assert [line.data for line in chunk.lines] == [b"ok", b"ok2"]
    assert len(chunk.garbled) == 1


def test_times_with_trimmed_fractions() -> None:
    base = parse_json_time("2026-11-29T23:48:23.000000000Z")
    assert parse_json_time("2026-11-29T23:48:23Z") == base
    assert parse_json_time("2026-11-29T23:48:23.55676374Z") == base + 556_763_740
    assert parse_json_time("2026-11-29T23:48:23.5Z") == base + 500_000_000
    assert parse_json_time("2026-11-29T23:48:23.5+01:00") == base + 500_000_000 - 3600 * 10**9
    for bad in ("2026-11-29T23:48:23.Z", "2026-11-29T23:48:23.1234567890Z", "2026-11-29", "x"):
        with pytest.raises(EngineStreamError):
            parse_json_time(bad)


def test_bad_times_after_good_ones_of_the_same_second_are_garbled() -> None:
    line = b'{"log":"x\\n","stream":"stdout","time":"2026-11-29T23:51:51.%sZ"}\n'
    data = b"".join(line % frac for frac in (b"1", b"1234567890", b"", b"12a", b"99"))
    chunk = JsonFileParser().feed(data)
    second = parse_json_time("2026-11-29T23:51:51Z")
    assert [line.ts_ns - second for line in chunk.lines] == [100_000_000, 990_000_000]
    assert len(chunk.garbled) == 3


def test_tty_drops_the_carriage_return() -> None:
    data = (DATA / "tty" / "c-json.log").read_bytes()
    lines, _ = parse_all(data, tty=True)
    assert [line.data for line in lines] == [b"tty-line", b"two"]


def test_an_overlong_line_is_skipped_and_the_next_one_kept() -> None:
    good = MIXED.splitlines(keepends=True)[0]
    parser = JsonFileParser()
    huge = b"x" * (MAX_ENTRY_BYTES + 10)
    got = parser.feed(huge[:1000])
    got2 = parser.feed(huge[1000:])
    got3 = parser.feed(b"yyy\n" + good)
    assert not got.garbled
    assert [g.offset for g in got2.garbled] == [0]
    assert [line.data for line in got3.lines] == [b"first"]
    assert parser.offset == len(huge) + 4 + len(good)


def test_flush_reports_an_unterminated_last_line() -> None:
    parser = JsonFileParser()
    parser.feed(MIXED[:50])
    chunk = parser.flush()
    assert [g.offset for g in chunk.garbled] == [0]
    assert parser.offset == 50


def test_rotated_chain_recordings_parse_whole() -> None:
    files = sorted((DATA / "compressed").iterdir(), reverse=True)  # .2.gz, .1.gz, current
    assert [f.name for f in files] == ["c-json.log.2.gz", "c-json.log.1.gz", "c-json.log"]
    texts = []
    for f in files:
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
        texts += [line.data for line in JsonFileParser().feed(data).lines]
    numbers = [int(t.split(b"-")[1]) for t in texts]
    assert numbers == list(range(numbers[0], 401))
