"""EngineLogSource: a catch-up read without ``follow``, then following, each line once."""

from __future__ import annotations

import struct
from collections.abc import AsyncGenerator

from forwarder.docker.logsource import EngineLogSource, ReplayFilter
from forwarder.records import ContainerInfo, RawLine
from forwarder.timefmt import format_since, format_time
from tests.helpers import CID, run

OUT, ERR = "stdout", "stderr"


def raw(source: str, ts_ns: int, text: str = "") -> RawLine:
    return RawLine(source, ts_ns, (text or f"{source}{ts_ns}").encode(), False)


def test_replay_of_the_last_lines_is_dropped() -> None:
    replays = ReplayFilter()
    assert replays.feed([raw(OUT, t) for t in (1, 2, 3, 3)]) == [raw(OUT, t) for t in (1, 2, 3, 3)]
    # The engine sends 2, 3, 3 again, then the new lines 3 (a third at that ns) and 4.
    again = [raw(OUT, 2), raw(OUT, 3), raw(OUT, 3), raw(OUT, 3, "new"), raw(OUT, 4)]
    assert replays.feed(again) == [raw(OUT, 3, "new"), raw(OUT, 4)]


def test_a_replay_split_across_batches() -> None:
    replays = ReplayFilter()
    replays.feed([raw(OUT, t) for t in (1, 2, 3)])
    assert replays.feed([raw(OUT, 2)]) == []
    assert replays.feed([raw(OUT, 3), raw(OUT, 4)]) == [raw(OUT, 4)]


def test_an_older_line_of_the_other_stream_is_taken() -> None:
    replays = ReplayFilter()
    replays.feed([raw(OUT, 5)])
    # stderr stamped before the stdout line but written after it: not a replay.
    assert replays.feed([raw(ERR, 4), raw(OUT, 6)]) == [raw(ERR, 4), raw(OUT, 6)]


def test_a_clock_step_back_is_not_a_replay() -> None:
    replays = ReplayFilter()
    replays.feed([raw(OUT, 100), raw(OUT, 101)])
    assert replays.feed([raw(OUT, 50), raw(OUT, 51)]) == [raw(OUT, 50), raw(OUT, 51)]


def test_the_seam_drops_the_lines_at_the_last_timestamp_per_stream() -> None:
    replays = ReplayFilter()
    replays.feed([raw(OUT, 1), raw(ERR, 2), raw(OUT, 3), raw(OUT, 3, "b")])
    replays.seam()
    # The follow request (since=3, inclusive) repeats both lines at 3.
    follow = [raw(OUT, 3), raw(OUT, 3, "b"), raw(ERR, 4), raw(OUT, 4)]
    assert replays.feed(follow) == [raw(ERR, 4), raw(OUT, 4)]


def frame(line: RawLine) -> bytes:
    payload = format_time(line.ts_ns).encode() + b" " + line.data + b"\n"
    return struct.pack(">BxxxL", 1 if line.source == OUT else 2, len(payload)) + payload


class FakeEngine:
    """The engine's log as a list; a request returns the lines from ``since`` on
    (inclusive), and with ``follow`` the lines of ``follow_extra`` after them."""

    def __init__(self, log: list[RawLine], follow_extra: list[RawLine]) -> None:
        self.log = log
        self.follow_extra = follow_extra
        self.requests: list[tuple[bool, str | None]] = []

    async def log_bytes(
        self, _cid: str, *, follow: bool, since: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        self.requests.append((follow, since))
        lines = self.log + (self.follow_extra if follow else [])
        for line in lines:
            if since is None or format_since(line.ts_ns) >= since:
                yield frame(line)


BASE = 1_800_000_000_000_000_000


def read_all(engine: FakeEngine, *, since: str | None, follow: bool) -> list[RawLine]:
    source = EngineLogSource(engine)  # type: ignore[arg-type]
    container = ContainerInfo(id=CID, name="/web", running=follow)

    async def collect() -> list[RawLine]:
        return [
            line
            async for batch in source.read(container, since=since, follow=follow)
            for line in batch.lines
        ]

    return run(collect())


def test_following_catches_up_without_follow_then_follows_from_its_last_line() -> None:
    log = [raw(OUT, BASE + t) for t in (1, 2, 2, 3)] + [raw(ERR, BASE + 3)]
    extra = [raw(OUT, BASE + 3, "new at 3"), raw(OUT, BASE + 4)]
    engine = FakeEngine(log, extra)
    assert read_all(engine, since=None, follow=True) == log + extra
    assert engine.requests == [(False, None), (True, format_since(BASE + 3))]


def test_a_read_without_follow_is_one_request() -> None:
    log = [raw(OUT, BASE + t) for t in (1, 2)]
    engine = FakeEngine(log, [raw(OUT, BASE + 9)])
    since = format_since(BASE + 2)
    assert read_all(engine, since=since, follow=False) == log[1:]
    assert engine.requests == [(False, since)]


def test_an_empty_catch_up_follows_from_the_given_since() -> None:
    engine = FakeEngine([], [raw(OUT, BASE + 5)])
    since = format_since(BASE)
    assert read_all(engine, since=since, follow=True) == [raw(OUT, BASE + 5)]
    assert engine.requests == [(False, since), (True, since)]
