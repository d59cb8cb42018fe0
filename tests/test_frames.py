"""The logs stream parsers and the partial-line joiner, on bytes recorded from a real engine.

The recordings under ``tests/data/engine/`` (see its README) come from Docker Engine 20.10;
the expected values below were read off the raw bytes, and timestamps are recomputed here
with ``calendar.timegm``, independently of the module under test.
"""

from __future__ import annotations

import calendar
import random
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from forwarder.docker import frames
from forwarder.docker.frames import (
    STDERR,
    STDOUT,
    Demuxer,
    EngineStreamError,
    LogLine,
    PartialJoiner,
    RawLine,
    TtyReader,
    split_timestamp,
)
from forwarder.timefmt import parse_time_ns
from tests.helpers import feed_all

DATA = Path(__file__).parent / "data" / "engine"


def ts_of(text: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS.fffffffffZ`` -> ns, without the code under test."""
    whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return whole * 1_000_000_000 + int(text[20:29])


def day(text: str) -> int:
    """A timestamp on the day of the recordings: ``day("07:20:26.350862375")``."""
    return ts_of(f"2026-11-25T{text}Z")


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def msg(ts: str, text: bytes, newline: bool = True) -> bytes:
    return ts.encode() + b" " + text + (b"\n" if newline else b"")


def demux(data: bytes, cuts: Iterable[int] = ()) -> list[RawLine]:
    """Feed ``data`` cut at ``cuts``; the parser must hold nothing back at the end."""
    parser = Demuxer()
    out: list[RawLine] = []
    prev = 0
    for cut in [*cuts, len(data)]:
        out += parser.feed(data[prev:cut])
        prev = cut
    assert parser.pending_bytes == 0
    return out


def tty(data: bytes, cuts: Iterable[int] = (), piece_bytes: int = 16384) -> list[RawLine]:
    reader = TtyReader(piece_bytes)
    out: list[RawLine] = []
    prev = 0
    for cut in [*cuts, len(data)]:
        out += reader.feed(data[prev:cut])
        prev = cut
    out += reader.flush()
    assert reader.pending_bytes == 0
    return out


def join(raw: list[RawLine], piece_bytes: int = 16384) -> list[LogLine]:
    joiner = PartialJoiner(1 << 20, piece_bytes=piece_bytes)
    return joiner.feed(raw) + joiner.flush()


def random_cuts(rng: random.Random, size: int) -> list[int]:
    return sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 12))))


# ------------------------------------------------------------------ recorded expectations

T_LONG = day("07:20:27.332405349")
T_ERR = day("07:20:27.633855851")
NONTTY_LONG = [
    RawLine(STDOUT, day("07:20:27.331101983"), b"before long", False),
    RawLine(STDOUT, T_LONG, b"a" * 16384, True),
    RawLine(STDERR, T_ERR, b"err during long line", False),
    RawLine(STDOUT, T_LONG, b"a" * 3616 + b"b" * 12768, True),
    RawLine(STDOUT, T_LONG, b"b" * 10232 + b"END", False),
    RawLine(STDOUT, day("07:20:27.940803728"), b"after long", False),
]

T_O = day("07:20:28.241545427")
T_E = day("07:20:28.448689435")
NONTTY_INTERLEAVED = [
    RawLine(STDOUT, day("07:20:28.241366661"), b"start", False),
    RawLine(STDOUT, T_O, b"o" * 16383 + b"\xc3", True),
    RawLine(STDERR, T_E, b"e" * 16384, True),
    RawLine(STDOUT, T_O, b"\xa9" + b"o" * 3616 + b"O" * 12767, True),
    # Engine < 23.0's local driver drops the "\n" of a split line's last piece.
    RawLine(STDOUT, T_O, b"O" * 2233 + b"|stdout end", True),
    RawLine(STDERR, T_E, b"e" * 3616 + b"E" * 100 + b"|stderr end", True),
    RawLine(STDOUT, day("07:20:28.861433066"), b"done", False),
]

T_T = day("07:20:29.193677932")
T_R = day("07:20:29.193781626")
TTY = [
    RawLine(STDOUT, day("07:20:29.193639875"), b"tty line 1", False),
    RawLine(STDOUT, day("07:20:29.193667115"), b"progress 50%\rprogress 100%", False),
    RawLine(STDOUT, day("07:20:29.193669860"), "utf8 é ü".encode(), False),
    RawLine(STDOUT, T_T, b"t" * 16384, True),
    RawLine(STDOUT, T_T, b"t" * 16384, True),
    RawLine(STDOUT, T_T, b"t" * 8232 + b"END", False),
    # 16383 "r" + "\r" filled a piece; the "\n" of its "\r\n" came as the next, empty one.
    RawLine(STDOUT, T_R, b"r" * 16383, False),
    RawLine(STDOUT, day("07:20:29.193814605"), b"err on tty", False),
    RawLine(STDOUT, day("07:20:29.193816247"), b"", False),
    RawLine(STDOUT, day("07:20:29.225664221"), b"tail without newline", False),
]

TTY_RESTART = [
    RawLine(STDOUT, day("07:20:29.560308921"), b"run line", False),
    RawLine(STDOUT, day("07:20:29.593302577"), b"prompt> ", True),
    RawLine(STDOUT, day("07:20:29.919565098"), b"run line", False),
    RawLine(STDOUT, day("07:20:29.942337071"), b"prompt> ", False),
]


def mixed(local: bool) -> list[RawLine]:
    """nontty-mixed*.bin: json-file replaces invalid UTF-8 itself, local keeps the bytes."""
    if local:
        times = ["829345510", "829609643", "829679867", "829772374", "830015235"]
        times += ["830044859", "830108173", "830135934", "931495785", "957739715"]
        first = [STDOUT, STDERR]
        bad, truncated = b"invalid utf8: \xff\xfe end", b"truncated utf8: \xc3"
        second = "26.9"
    else:
        times = ["350862375", "350923401", "350957071", "350960476", "350963931"]
        times += ["350966715", "350969259", "350971612", "452300637", "480412342"]
        first = [STDERR, STDOUT]
        bad = "invalid utf8: \ufffd\ufffd end".encode()
        truncated = "truncated utf8: \ufffd".encode()
        second = "26.4"
    texts = {STDOUT: b"plain stdout line", STDERR: b"plain stderr line"}
    rows = [(first[0], texts[first[0]]), (first[1], texts[first[1]])]
    rows += [(STDOUT, b""), (STDOUT, "utf8: é ü 日本".encode()), (STDOUT, bad)]
    rows += [(STDOUT, truncated), (STDOUT, b"carriage return kept\r")]
    rows += [(STDOUT, b"tab\tseparated"), (STDERR, b"second stderr line")]
    rows += [(STDOUT, b"no newline at exit")]
    out = []
    for i, ((source, text), frac) in enumerate(zip(rows, times, strict=True)):
        whole = "07:20:26." if i < 8 else f"07:20:{second[:2]}."
        out.append(RawLine(source, day(whole + frac), text, i == 9))
    return out


# ------------------------------------------------------------------ timestamps


def test_split_timestamp() -> None:
    assert split_timestamp(b"2026-11-25T07:12:34.123456789Z hello world\n") == (
        ts_of("2026-11-25T07:12:34.123456789Z"),
        b"hello world\n",
    )
    assert split_timestamp(b"2026-11-25T08:12:34.000000001+01:00 x") == (
        ts_of("2026-11-25T07:12:34.000000001Z"),
        b"x",
    )
    with pytest.raises(EngineStreamError, match="no timestamp"):
        split_timestamp(b"2026-11-25T07:12:34.123456789Zhello")
    with pytest.raises(EngineStreamError, match="timestamp out of range"):
        split_timestamp(b"2026-02-29T07:12:34.123456789Z x")
    with pytest.raises(EngineStreamError, match="bad timestamp"):
        split_timestamp(b"2026-11-25T07:12:34.1234+01:00 x")  # 30 bytes, 4 digits


# ------------------------------------------------------------------ Demuxer


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("nontty-mixed.bin", mixed(local=False)),
        ("nontty-mixed-local.bin", mixed(local=True)),
        ("nontty-long.bin", NONTTY_LONG),
        ("nontty-long.since-long.bin", NONTTY_LONG[1:]),
        ("nontty-long.since-err.bin", NONTTY_LONG[2:3] + NONTTY_LONG[5:]),
        ("nontty-interleaved.bin", NONTTY_INTERLEAVED),
    ],
)
def test_demuxer_recorded(name: str, expected: list[RawLine]) -> None:
    got = demux(load(name))
    assert got == expected
    assert all(type(line.data) is bytes for line in got)
    assert all(line.source is STDOUT or line.source is STDERR for line in got)


@pytest.mark.parametrize(
    "name", ["nontty-mixed.bin", "nontty-mixed-local.bin", "nontty-restart.bin"]
)
def test_demuxer_every_split_small(name: str) -> None:
    data = load(name)
    whole = demux(data)
    for cut in range(len(data) + 1):
        assert demux(data, [cut]) == whole, cut
    assert demux(data, range(1, len(data))) == whole  # byte by byte


@pytest.mark.parametrize("name", ["nontty-long.bin", "nontty-interleaved.bin"])
def test_demuxer_every_split_long(name: str) -> None:
    data = load(name)
    whole = demux(data)
    parser = Demuxer()
    for cut in range(len(data) + 1):
        parser = Demuxer()
        got = parser.feed(data[:cut])
        assert parser.pending_bytes == cut - sum(
            8 + 31 + len(x.data) + (not x.partial) for x in got
        )
        assert got + parser.feed(data[cut:]) == whole, cut
    assert demux(data, range(1, len(data))) == whole


def test_demuxer_random_multi_splits() -> None:
    rng = random.Random(20261125)
    data = load("nontty-mixed.bin") + load("nontty-interleaved.bin") + load("nontty-long.bin")
    whole = demux(data)
    assert len(whole) == 10 + 7 + 6
    for _ in range(300):
        assert demux(data, random_cuts(rng, len(data))) == whole


def test_demuxer_timestamps_across_seconds_days_and_years() -> None:
    texts = [
        "2023-12-31T23:59:59.999999998Z",
        "2023-12-31T23:59:59.999999999Z",
        "2024-01-01T00:00:00.000000000Z",
        "2024-01-01T00:00:00.000000001Z",
        "2024-02-28T23:59:59.999999999Z",
        "2024-02-29T00:00:00.000000000Z",
        "2024-02-29T23:59:59.999999999Z",
        "2024-03-01T00:00:00.000000000Z",
        "2024-03-01T00:00:00.000000000Z",  # the same nanosecond twice
        "2026-11-25T08:12:34.123456789+01:00",
        "2026-11-25T07:12:34.123456790Z",
    ]
    data = b"".join(frame(1, msg(text, b"x%d" % i)) for i, text in enumerate(texts))
    expected = [
        RawLine(
            STDOUT,
            ts_of(t) if t.endswith("Z") else ts_of("2026-11-25T07:12:34.123456789Z"),
            b"x%d" % i,
            False,
        )
        for i, t in enumerate(texts)
    ]
    assert demux(data) == expected
    assert demux(data, range(1, len(data))) == expected


def test_demuxer_parses_each_second_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []

    def counting(ts: bytes, *, fraction_digits: int | None = None) -> int:
        calls.append(ts)
        return parse_time_ns(ts, fraction_digits=fraction_digits)

    monkeypatch.setattr(frames, "parse_time_ns", counting)
    seconds = ["2026-11-25T07:12:34", "2026-11-25T07:12:35"]
    data = b"".join(
        frame(1, msg(f"{second}.{i:09d}Z", b"x")) for second in seconds for i in range(50)
    )
    got = demux(data)
    assert [x.ts_ns for x in got] == [
        ts_of(f"{sec}.{i:09d}Z") for sec in seconds for i in range(50)
    ]
    assert len(calls) == 2  # the rest took the same-second path


def test_demuxer_stdin_counts_as_stdout() -> None:
    data = frame(0, msg("2026-11-25T07:12:34.123456789Z", b"in"))
    assert demux(data) == [RawLine(STDOUT, ts_of("2026-11-25T07:12:34.123456789Z"), b"in", False)]


def test_demuxer_engine_error_frame() -> None:
    good = frame(1, msg("2026-11-25T07:12:34.123456789Z", b"before"))
    error = frame(3, b"Error grabbing logs: log message is too large\n")
    after = frame(2, msg("2026-11-25T07:12:35.000000000Z", b"after"))
    reported: list[str] = []
    parser = Demuxer(on_engine_error=reported.append)
    assert [x.data for x in parser.feed(good + error + after)] == [b"before", b"after"]
    assert reported == ["Error grabbing logs: log message is too large"]
    with pytest.raises(EngineStreamError, match="the engine reported: Error grabbing logs"):
        Demuxer().feed(good + error + after)


def _error_of(data: bytes) -> str:
    with pytest.raises(EngineStreamError) as info:
        demux(data)
    return str(info.value)


def test_demuxer_trailing_garbage() -> None:
    valid = load("nontty-mixed.bin")
    message = _error_of(valid + b"garbage! " * 200)
    assert f"bad frame header at stream offset {len(valid)}" in message
    assert "b'garbage! garbage! " in message
    assert len(message) < 150  # at most 40 bytes of it shown


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"\x01\x00\x01\x00\x00\x00\x00\x30", "bad frame header"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x30", "bad frame header"),
        (b"\x01\x00\x00\x00\xff\xff\xff\xff", "oversized frame"),  # not waiting for 4 GiB
        (b"\x02\x00\x00\x00\x00\x10\x00\x01", "oversized frame"),
    ],
)
def test_demuxer_bad_header(header: bytes, why: str) -> None:
    valid = frame(1, msg("2026-11-25T07:12:34.123456789Z", b"ok"))
    for cut in range(len(valid), len(valid) + 9):  # however the header arrives
        parser = Demuxer()
        data = valid + header
        with pytest.raises(EngineStreamError, match=f"^{why} at stream offset {len(valid)}: "):
            feed_all(parser.feed, data[:cut], data[cut:])
        with pytest.raises(EngineStreamError, match="already broken"):
            parser.feed(b"")


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"hi\n", "no timestamp"),
        (b"2026-11-25T07:12:34.123456789Z\n", "no timestamp"),
        (b"2026-11-25T07:12:34.123456789Zhello\n", "no timestamp"),
        (b"2026-11-25T07:12:34.12345678xZ hello\n", "bad timestamp"),
        (b"2026-11-31T07:12:34.123456789Z hello\n", "out of range"),
        (b"yesterday at noon, more or less \n", "no timestamp"),
        (b"yesterday at noon, more or les \n", "bad timestamp"),
    ],
)
def test_demuxer_bad_timestamp(payload: bytes, why: str) -> None:
    # The line before fills the same-second cache, so the fast path sees the junk first.
    first = frame(1, msg("2026-11-25T07:12:34.000000000Z", b"ok"))
    message = _error_of(first + frame(2, payload))
    assert why in message
    assert f"offset {len(first) + 8}" in message


def test_demuxer_incomplete_frame_is_pending() -> None:
    data = frame(1, msg("2026-11-25T07:12:34.123456789Z", b"hello"))
    parser = Demuxer()
    assert parser.feed(data[:5]) == []
    assert parser.pending_bytes == 5
    assert parser.feed(data[5:-1]) == []
    assert parser.pending_bytes == len(data) - 1
    assert parser.feed(data[-1:]) == [
        RawLine(STDOUT, ts_of("2026-11-25T07:12:34.123456789Z"), b"hello", False)
    ]
    assert parser.pending_bytes == 0


# ------------------------------------------------------------------ TtyReader


def test_tty_recorded() -> None:
    assert tty(load("tty.bin")) == TTY


def test_tty_recorded_restart_tail_is_cut_at_the_next_runs_timestamp() -> None:
    # "TS1 prompt> TS2 run line\r\n": the tail left at exit and the next run's first line.
    assert tty(load("tty-restart.bin")) == TTY_RESTART


def test_tty_tail_waits_until_flush() -> None:
    data = load("tty.bin")
    reader = TtyReader()
    assert reader.feed(data) == TTY[:-1]
    assert reader.pending_bytes == 31 + len(b"tail without newline")
    assert reader.flush() == TTY[-1:]
    assert reader.flush() == []


@pytest.mark.parametrize("name", ["tty.bin", "tty-restart.bin"])
def test_tty_every_split(name: str) -> None:
    data = load(name)
    whole = tty(data)
    for cut in range(len(data) + 1):
        assert tty(data, [cut]) == whole, cut
    assert tty(data, range(1, len(data))) == whole


def test_tty_random_multi_splits() -> None:
    rng = random.Random(1125)
    data = load("tty.bin")
    for _ in range(300):
        assert tty(data, random_cuts(rng, len(data))) == TTY


TS1 = "2026-11-25T07:12:34.000000001Z"
TS2 = "2026-11-25T07:12:34.000000002Z"


def test_tty_own_earlier_timestamp_in_text_is_not_a_boundary() -> None:
    # A program printing its clock: earlier than the engine's stamp, so it is text.
    text = b"at 2026-11-25T07:12:34.000000000Z something happened"
    assert tty(msg(TS1, text + b"\r")) == [RawLine(STDOUT, ts_of(TS1), text, False)]
    # Shaped like a timestamp but no date at all: text as well.
    text = b"x 2026-19-99T99:99:99.000000000Z y"
    assert tty(msg(TS1, text + b"\r")) == [RawLine(STDOUT, ts_of(TS1), text, False)]


def test_tty_piece_boundary_found_by_timestamp_for_other_piece_sizes() -> None:
    # A logger with another buffer size: the boundary is found by the repeated timestamp.
    data = msg(TS1, b"a" * 40, newline=False) + msg(TS1, b"b" * 7 + b"\r")
    expected = [
        RawLine(STDOUT, ts_of(TS1), b"a" * 40, True),
        RawLine(STDOUT, ts_of(TS1), b"b" * 7, False),
    ]
    for piece_bytes in (40, 16, 16384):
        assert tty(data, piece_bytes=piece_bytes) == expected
        assert tty(data, range(1, len(data)), piece_bytes=piece_bytes) == expected


def test_tty_carriage_return_at_a_piece_end() -> None:
    # "\r" closes a full piece and the "\n" of its "\r\n" comes alone: the line ends there.
    piece = msg(TS1, b"abcdefg\r", newline=False)
    data = piece + msg(TS1, b"") + msg(TS2, b"next\r")
    expected = [
        RawLine(STDOUT, ts_of(TS1), b"abcdefg", False),
        RawLine(STDOUT, ts_of(TS2), b"next", False),
    ]
    assert tty(data, piece_bytes=8) == expected
    assert tty(data, range(1, len(data)), piece_bytes=8) == expected
    # A "\r" inside the line, right before the piece boundary, stays.
    data = piece + msg(TS1, b"xyz\r")
    raw = tty(data, piece_bytes=8)
    assert raw == [
        RawLine(STDOUT, ts_of(TS1), b"abcdefg\r", True),
        RawLine(STDOUT, ts_of(TS1), b"xyz", False),
    ]
    assert tty(data, range(1, len(data)), piece_bytes=8) == raw
    assert join(raw, piece_bytes=8) == [LogLine(STDOUT, ts_of(TS1), "abcdefg\rxyz")]
    # Nothing continues it (an exit, the stream's end): the "\r" was the line's end.
    raw = tty(piece + msg(TS2, b"next\r"), piece_bytes=8)
    assert raw == [RawLine(STDOUT, ts_of(TS1), b"abcdefg", True), expected[1]]
    assert tty(piece, piece_bytes=8) == [RawLine(STDOUT, ts_of(TS1), b"abcdefg", False)]
    reader = TtyReader(piece_bytes=8)
    assert reader.feed(piece) == []
    assert reader.pending_bytes == 31 + 8  # a piece or a tail? the next message will tell


def test_tty_tail_is_cut_as_soon_as_the_next_timestamp_arrives() -> None:
    tail = msg(TS1, b"prompt> ", newline=False)
    nxt = msg(TS2, b"more", newline=False)
    for cut in range(len(nxt) + 1):
        reader = TtyReader()
        assert reader.feed(tail) == []
        got = reader.feed(nxt[:cut]) + reader.feed(nxt[cut:])
        assert got == [RawLine(STDOUT, ts_of(TS1), b"prompt> ", True)], cut
        assert reader.pending_bytes == len(nxt)


def test_tty_junk() -> None:
    valid = msg(TS1, b"fine\r")
    with pytest.raises(EngineStreamError, match=f"offset {len(valid)}.*no timestamp"):
        tty(valid + b"this is not a timestamp at all, no\r\n")
    with pytest.raises(EngineStreamError, match="offset 0"):
        tty(b"hello\r\n")
    reader = TtyReader()
    assert reader.feed(valid + b"2026-11-25T07:1") == [RawLine(STDOUT, ts_of(TS1), b"fine", False)]
    assert reader.pending_bytes == 15
    with pytest.raises(EngineStreamError, match="no timestamp"):
        reader.flush()  # the stream ended inside a timestamp
    with pytest.raises(EngineStreamError, match="already broken"):
        reader.feed(b"")


def test_tty_message_without_end_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "MAX_TTY_MESSAGE_BYTES", 100)
    reader = TtyReader(piece_bytes=50)
    # 50 bytes with no newline, then no repeated timestamp: no way to find the end.
    assert reader.feed(msg(TS1, b"z" * 60, newline=False)) == []
    with pytest.raises(EngineStreamError, match="runs past 100 bytes"):
        reader.feed(b"z" * 20)


def test_tty_engine_error_line() -> None:
    data = msg(TS1, b"a\r") + b"Error grabbing logs: boom\n" + msg(TS2, b"b\r")
    reported: list[str] = []
    reader = TtyReader(on_engine_error=reported.append)
    got = [x.data for x in reader.feed(data[:40]) + reader.feed(data[40:])]
    assert got == [b"a", b"b"]
    assert reported == ["Error grabbing logs: boom"]
    with pytest.raises(EngineStreamError, match="the engine reported: Error grabbing logs: boom"):
        tty(data)


# ------------------------------------------------------------------ PartialJoiner


def test_joiner_recorded_long_line_in_first_piece_order() -> None:
    lines = join(demux(load("nontty-long.bin")))
    assert lines == [
        LogLine(STDOUT, day("07:20:27.331101983"), "before long"),
        LogLine(STDOUT, T_LONG, "a" * 20000 + "b" * 23000 + "END"),
        # Completed before the long line did, yet comes after it: its first piece was first.
        LogLine(STDERR, T_ERR, "err during long line"),
        LogLine(STDOUT, day("07:20:27.940803728"), "after long"),
    ]


def test_joiner_holds_other_source_behind_unfinished_line() -> None:
    joiner = PartialJoiner(1 << 20)
    assert joiner.feed(NONTTY_LONG[:2]) == [LogLine(STDOUT, NONTTY_LONG[0].ts_ns, "before long")]
    assert joiner.feed(NONTTY_LONG[2:3]) == []  # stderr's line waits
    assert joiner.pending_bytes == 16384 + len(b"err during long line")
    assert joiner.feed(NONTTY_LONG[3:4]) == []
    done = joiner.feed(NONTTY_LONG[4:5])
    assert [(x.source, len(x.text)) for x in done] == [(STDOUT, 43003), (STDERR, 20)]
    assert joiner.pending_bytes == 0


def test_joiner_recorded_interleaved_sources_never_mix() -> None:
    lines = join(demux(load("nontty-interleaved.bin")))
    assert lines == [
        LogLine(STDOUT, day("07:20:28.241366661"), "start"),
        # The "é" was cut between two pieces: joined before decoding, so no U+FFFD.
        LogLine(STDOUT, T_O, "o" * 16383 + "é" + "o" * 3616 + "O" * 15000 + "|stdout end"),
        LogLine(STDERR, T_E, "e" * 20000 + "E" * 100 + "|stderr end"),
        LogLine(STDOUT, day("07:20:28.861433066"), "done"),
    ]


def test_joiner_recorded_tty() -> None:
    assert [x.text for x in join(tty(load("tty.bin")))] == [
        "tty line 1",
        "progress 50%\rprogress 100%",
        "utf8 é ü",
        "t" * 41000 + "END",
        "r" * 16383,
        "err on tty",
        "",
        "tail without newline",
    ]


@pytest.mark.parametrize(
    ("name", "parse"), [("nontty-restart.bin", demux), ("tty-restart.bin", tty)]
)
def test_joiner_timestamp_change_ends_an_exit_tail(
    name: str, parse: Callable[[bytes], list[RawLine]]
) -> None:
    # "prompt> " was left unterminated at exit; the next run's line has a new timestamp.
    lines = join(parse(load(name)))
    assert [x.text for x in lines] == ["run line", "prompt> ", "run line", "prompt> "]
    assert len({x.ts_ns for x in lines}) == 4


def test_joiner_whole_pieces_join_across_timestamps() -> None:
    # journald stamps each entry itself, so a line's pieces differ in time; a piece that
    # filled the copier's buffer is still continued.
    raw = [
        RawLine(STDOUT, 10, b"a" * 16384, True),
        RawLine(STDOUT, 11, b"b" * 16384, True),
        RawLine(STDOUT, 12, b"c", False),
        RawLine(STDOUT, 13, b"short tail", True),
        RawLine(STDOUT, 14, b"next run", False),
    ]
    assert join(raw) == [
        LogLine(STDOUT, 10, "a" * 16384 + "b" * 16384 + "c"),
        LogLine(STDOUT, 13, "short tail"),
        LogLine(STDOUT, 14, "next run"),
    ]


def test_joiner_timestamp_change_ends_a_long_piece() -> None:
    # A logger with a bigger buffer than the engine's usual: its pieces are longer, and a
    # new timestamp still means a new line.
    raw = [RawLine(STDOUT, 1, b"abcdef", True), RawLine(STDOUT, 2, b"next", False)]
    assert join(raw, piece_bytes=4) == [LogLine(STDOUT, 1, "abcdef"), LogLine(STDOUT, 2, "next")]
    raw = [RawLine(STDOUT, 1, b"abcdef", True), RawLine(STDOUT, 1, b"ghij", False)]
    assert join(raw, piece_bytes=4) == [LogLine(STDOUT, 1, "abcdefghij")]


def test_joiner_invalid_utf8_replaced() -> None:
    lines = join(demux(load("nontty-mixed-local.bin")))
    assert lines[4].text == "invalid utf8: \ufffd\ufffd end"
    assert lines[5].text == "truncated utf8: \ufffd"
    raw = [RawLine(STDERR, 1, b"\xff", True), RawLine(STDERR, 1, b"\xfe", False)]
    assert join(raw, piece_bytes=1) == [LogLine(STDERR, 1, "\ufffd\ufffd")]
    assert join([RawLine(STDOUT, 1, b"\xed\xa0\x80 surrogate", False)])[0].text.endswith(
        " surrogate"
    )


def test_joiner_any_batching_gives_the_same_lines() -> None:
    raw = demux(load("nontty-interleaved.bin")) + demux(load("nontty-long.bin"))
    whole = join(raw)
    for cut in range(len(raw) + 1):
        joiner = PartialJoiner(1 << 20)
        assert joiner.feed(raw[:cut]) + joiner.feed(raw[cut:]) + joiner.flush() == whole, cut


def test_joiner_flush_emits_unfinished_lines_in_order() -> None:
    joiner = PartialJoiner(1 << 20, piece_bytes=3)
    assert joiner.feed([RawLine(STDOUT, 1, b"out", True), RawLine(STDERR, 2, b"err", True)]) == []
    assert joiner.feed([RawLine(STDERR, 2, b"!", False), RawLine(STDERR, 4, b"e", False)]) == []
    assert joiner.pending_bytes == 3 + 4 + 1
    assert joiner.flush() == [
        LogLine(STDOUT, 1, "out"),
        LogLine(STDERR, 2, "err!"),
        LogLine(STDERR, 4, "e"),
    ]
    assert joiner.pending_bytes == 0
    assert joiner.flush() == []


def test_joiner_short_piece_ends_the_line() -> None:
    # Only a piece that filled the engine's buffer continues; on engine 20.10 with the
    # local driver a split line's last piece lacks its "\n", so it must end the line now.
    raw = demux(load("nontty-interleaved.bin"))
    joiner = PartialJoiner(1 << 20)
    assert [x.text[-11:] for x in joiner.feed(raw[:5])] == ["start", "|stdout end"]
    assert [x.text[-11:] for x in joiner.feed(raw[5:6])] == ["|stderr end"]
    assert joiner.pending_bytes == 0
    # An exit's tail likewise, without waiting for the next run or the stream's end.
    assert PartialJoiner(1 << 20).feed([RawLine(STDOUT, 5, b"prompt> ", True)]) == [
        LogLine(STDOUT, 5, "prompt> ")
    ]


def test_joiner_splits_past_max_line_bytes() -> None:
    splits: list[tuple[str, int]] = []
    joiner = PartialJoiner(10, lambda source, size: splits.append((source, size)), piece_bytes=7)
    lines = joiner.feed(
        [
            RawLine(STDOUT, 1, b"0123456789", False),  # exactly the cap: not split
            RawLine(STDERR, 2, b"abcdefghijklmnopqrstuvwxy", False),  # a whole line too long
            RawLine(STDOUT, 3, b"ABCDEFG", True),
            RawLine(STDOUT, 3, b"HIJKLMN", True),
        ]
    )
    assert lines == [
        LogLine(STDOUT, 1, "0123456789"),
        LogLine(STDERR, 2, "abcdefghij"),
        LogLine(STDERR, 2, "klmnopqrst"),
        LogLine(STDERR, 2, "uvwxy"),
        LogLine(STDOUT, 3, "ABCDEFGHIJ"),  # cut while the line is still arriving
    ]
    assert joiner.pending_bytes == 4
    assert joiner.feed([RawLine(STDOUT, 3, b"OP", False)]) == [LogLine(STDOUT, 3, "KLMNOP")]
    assert splits == [(STDERR, 10), (STDOUT, 10)]  # once per line, not once per cut


def test_joiner_reports_a_long_line_once_however_many_pieces() -> None:
    splits: list[tuple[str, int]] = []
    joiner = PartialJoiner(1 << 20, lambda source, size: splits.append((source, size)))
    piece = b"x" * frames.PIECE_BYTES
    # A 5 MiB line in the engine's 16 KiB pieces, stderr lines between them.
    out: list[LogLine] = []
    for n in range(5 * 64):
        out += joiner.feed([RawLine(STDOUT, 7, piece, True), RawLine(STDERR, 8 + n, b"e", False)])
    out += joiner.feed([RawLine(STDOUT, 7, b"end", False)])
    assert [len(x.text) for x in out if x.source == STDOUT] == [1 << 20] * 5 + [3]
    assert splits == [(STDOUT, 1 << 20)]
    # The next long line is reported again, and a line that never ends only once.
    for _ in range(10 * 64):
        joiner.feed([RawLine(STDOUT, 9, piece, True)])
    assert splits == [(STDOUT, 1 << 20)] * 2


def test_joiner_split_keeps_utf8_sequences_whole() -> None:
    splits: list[tuple[str, int]] = []
    joiner = PartialJoiner(10, lambda source, size: splits.append((source, size)), piece_bytes=9)
    data = "aaaaaaaaé€😀b".encode()  # é at bytes 8-9, € 10-12, 😀 13-16
    assert data[9:11] == b"\xa9\xe2"
    lines = joiner.feed([RawLine(STDOUT, 1, data[:9], True), RawLine(STDOUT, 1, data[9:], False)])
    assert [x.text for x in lines] == ["aaaaaaaaé", "€😀b"]
    assert splits == [(STDOUT, 10)]
    lines = PartialJoiner(9).feed([RawLine(STDOUT, 1, data, False)])
    assert [x.text for x in lines] == ["aaaaaaaa", "é€😀", "b"]  # cut before é, before b


def test_joiner_caps_lines_held_behind_an_unfinished_one() -> None:
    splits: list[tuple[str, int]] = []
    joiner = PartialJoiner(
        1000, lambda s, n: splits.append((s, n)), max_held_bytes=25, piece_bytes=16
    )
    assert joiner.feed([RawLine(STDOUT, 1, b"slow" * 4, True)]) == []
    assert joiner.feed([RawLine(STDERR, 2, b"e" * 10, False)] * 2) == []
    assert joiner.pending_bytes == 16 + 20
    # The third held line passes the cap: the stdout line goes out as far as it got.
    assert joiner.feed([RawLine(STDERR, 3, b"f" * 10, False)]) == [
        LogLine(STDOUT, 1, "slow" * 4),
        LogLine(STDERR, 2, "e" * 10),
        LogLine(STDERR, 2, "e" * 10),
        LogLine(STDERR, 3, "f" * 10),
    ]
    assert splits == [(STDOUT, 16)]
    # Its rest is a line of its own.
    assert joiner.feed([RawLine(STDOUT, 1, b"done", False)]) == [LogLine(STDOUT, 1, "done")]
    assert joiner.pending_bytes == 0


def test_joiner_rejects_a_zero_cap() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        PartialJoiner(0)


# ------------------------------------------------------------------ resume positions


def replay(raw: list[RawLine], since_ns: int) -> list[RawLine]:
    """What the engine returns for ``since``: each message whose own stamp is >= since."""
    return [x for x in raw if x.ts_ns >= since_ns]


def resume(lines: list[LogLine], ts_ns: int, count: int) -> list[LogLine]:
    """Drop the ``count`` lines at ``ts_ns`` already taken (and any older)."""
    out = []
    for line in lines:
        if line.ts_ns < ts_ns or (line.ts_ns == ts_ns and count > 0):
            count -= line.ts_ns == ts_ns
            continue
        out.append(line)
    return out


def check_every_position(raw: list[RawLine]) -> int:
    lines = join(raw)
    for taken in range(1, len(lines) + 1):
        ts_ns = lines[taken - 1].ts_ns
        count = sum(1 for x in lines[:taken] if x.ts_ns == ts_ns)
        assert resume(join(replay(raw, ts_ns)), ts_ns, count) == lines[taken:], taken
    return len(lines)


def test_replay_model_matches_the_engine() -> None:
    raw = demux(load("nontty-long.bin"))
    assert replay(raw, T_LONG) == demux(load("nontty-long.since-long.bin"))
    assert replay(raw, T_ERR) == demux(load("nontty-long.since-err.bin"))


@pytest.mark.parametrize("name", ["nontty-long.bin", "nontty-interleaved.bin"])
def test_resume_from_every_position_is_exact_recorded(name: str) -> None:
    assert check_every_position(demux(load(name))) == 4


def test_resume_from_stderr_line_keeps_the_long_line() -> None:
    # Had the stderr line gone out first, a position at it would lose the long line's end:
    # the engine's replay from T_ERR holds no piece of it.
    lines = join(demux(load("nontty-long.bin")))
    assert [x.ts_ns for x in lines] == sorted(x.ts_ns for x in lines)
    assert not [x for x in demux(load("nontty-long.since-err.bin")) if x.ts_ns == T_LONG]


def test_resume_from_every_position_is_exact_random() -> None:
    rng = random.Random(99)
    for _ in range(200):
        raw: list[RawLine] = []
        now = 1_000
        open_lines: dict[str, tuple[int, int]] = {}  # source -> (ts, pieces left)
        for _ in range(rng.randint(1, 25)):
            source = rng.choice([STDOUT, STDERR])
            if source in open_lines:
                ts, left = open_lines[source]
            else:
                now += rng.choice([0, 1, 1, 2])  # equal stamps happen
                ts, left = now, rng.choice([1, 1, 1, 2, 3])
            left -= 1
            data = b"%s-%d-%d" % (source.encode(), ts, left)
            raw.append(RawLine(source, ts, data.ljust(16384, b".") if left else data, left > 0))
            if left:
                open_lines[source] = (ts, left)
            else:
                open_lines.pop(source, None)
        check_every_position(raw)


def test_a_corrupt_frame_keeps_the_good_lines_before_it() -> None:
    good = frame(1, msg("2026-11-25T07:12:34.000000001Z", b"one"))
    good += frame(2, msg("2026-11-25T07:12:34.000000002Z", b"two"))
    flipped = b"\x41" + frame(1, msg("2026-11-25T07:12:34.000000003Z", b"three"))[1:]
    parser = Demuxer()
    parser.feed(good[:5])  # the first frame's start came in the read before
    with pytest.raises(EngineStreamError) as info:
        parser.feed(good[5:] + flipped)
    assert str(info.value).startswith(f"bad frame header at stream offset {len(good)}: ")
    assert [(x.source, x.data) for x in info.value.lines] == [(STDOUT, b"one"), (STDERR, b"two")]
    with pytest.raises(EngineStreamError, match="already broken") as info:
        parser.feed(b"")
    assert info.value.lines == []


def test_a_corrupt_tty_message_keeps_the_good_lines_before_it() -> None:
    good = msg("2026-11-25T07:12:34.000000001Z", b"one\r")
    good += msg("2026-11-25T07:12:34.000000002Z", b"two\r")
    with pytest.raises(EngineStreamError) as info:
        TtyReader().feed(good + b"2026-13-25T07:12:34.000000003Z three\r\n")
    assert f"stream offset {len(good)}" in str(info.value)
    assert [x.data for x in info.value.lines] == [b"one", b"two"]
