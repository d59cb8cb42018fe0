"""Resume positions and self-detection, without an engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forwarder.docker.discovery import self_container_id
from forwarder.docker.follower import ResumeFilter, advance, follow_container
from forwarder.docker.frames import PIECE_BYTES
from forwarder.docker.logsource import RawBatch
from forwarder.multiline import PRESETS, Joiner, Limits
from forwarder.records import ContainerInfo, LogLine, Position, RawLine


def lines(*stamps: int) -> list[LogLine]:
    return [LogLine("stdout", ts, f"l{i}") for i, ts in enumerate(stamps)]


def test_advance_counts_lines_at_the_newest_nanosecond() -> None:
    assert advance(None, []) is None
    assert advance(None, lines(1, 2, 2)) == Position(2, 2)
    assert advance(Position(2, 2), lines(2, 2)) == Position(2, 4)
    assert advance(Position(5, 1), lines(3)) == Position(5, 1)  # never backwards


def test_resume_skips_exactly_the_lines_taken_at_the_position() -> None:
    batch = lines(10, 10, 10, 11)
    resume = ResumeFilter(Position(10, 2))
    assert [line.text for line in resume.feed(batch)] == ["l2", "l3"]
    assert not resume.active
    assert resume.feed(batch) == batch  # past the position, everything is new


def test_resume_across_batches() -> None:
    resume = ResumeFilter(Position(10, 3))
    assert resume.feed(lines(10, 10)) == []
    assert [line.ts_ns for line in resume.feed(lines(10, 10, 12))] == [10, 12]


def test_every_position_resumes_exactly() -> None:
    stream = lines(1, 2, 2, 2, 3, 4, 4, 5)
    for cut in range(len(stream) + 1):
        position = advance(None, stream[:cut])
        rest = ResumeFilter(position).feed(
            [line for line in stream if position is None or line.ts_ns >= position.ts_ns]
        )
        assert stream[:cut] + rest == stream, cut


def test_self_container_id_from_cgroup_and_mountinfo(tmp_path: Path) -> None:
    cid = "ab" * 32
    (tmp_path / "cgroup").write_text(f"12:memory:/docker/{cid}\n0::/\n")
    assert self_container_id(tmp_path) == cid
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "mountinfo").write_text(
        f"1 2 0:3 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4 x rw\n"
    )
    assert self_container_id(tmp_path) == cid
    (tmp_path / "mountinfo").write_text("1 2 0:3 / / rw - ext4 x rw\n")
    assert self_container_id(tmp_path) is None


class PiecesSource:
    """A log stream of canned batches of engine messages."""

    def __init__(self, *batches: list[RawLine]) -> None:
        self.batches = batches

    async def read(
        self,
        _container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None = None,
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[RawBatch]:
        del since, follow, position, stopped  # in the real signature; unused here
        for batch in self.batches:
            yield RawBatch(batch)


def test_a_long_line_is_logged_once_not_once_per_piece(caplog: pytest.LogCaptureFixture) -> None:
    piece = RawLine("stdout", 7, b"x" * PIECE_BYTES, True)
    # A 5 MiB line, a read of 64 pieces (1 MiB) at a time, then a short line.
    batches = [[piece] * 64 for _ in range(5)]
    batches.append([RawLine("stdout", 7, b"end", False), RawLine("stdout", 8, b"next", False)])
    got: list[LogLine] = []

    async def sink(_container: ContainerInfo, lines: list[LogLine], _position: Position) -> None:
        got.extend(lines)

    async def main() -> None:
        await follow_container(
            ContainerInfo(id="ab" * 32, name="/web"),
            PiecesSource(*batches),
            sink,
            position=None,
            since=None,
            follow=True,
            max_line_bytes=1 << 20,
            on_position=lambda _position: None,
        )

    with caplog.at_level(logging.WARNING, logger="forwarder.docker.follower"):
        asyncio.run(main())
    assert [len(line.text) for line in got] == [1 << 20] * 5 + [3, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "container /web: a stdout line is longer than max_line_bytes; split after 1048576 bytes"
    ]


def test_records_before_a_group_pending_since_the_first_line_are_sent_not_dropped() -> None:
    """A whole trace in one read, the log's first lines: the joiner gives the single lines
    before the trace's group with no position yet to commit (the group is pending since
    before any). They wait for the next position; none is lost."""
    trace = (Path(__file__).parent / "data" / "multiline" / "java.log").read_text().splitlines()
    # As a container wrote it (tests/test_e2e_shaping.py): ten lines of the trace, a stdout
    # line, the rest of the trace, all in the log's first read.
    raw = [RawLine("stderr", 1_000 + i, text.encode(), False) for i, text in enumerate(trace)]
    raw.insert(10, RawLine("stdout", 1_010, b"between", False))
    got: list[LogLine] = []
    positions: list[Position] = []

    async def sink(_container: ContainerInfo, lines: list[LogLine], position: Position) -> None:
        got.extend(lines)
        positions.append(position)

    async def main() -> None:
        await follow_container(
            ContainerInfo(id="ab" * 32, name="/web"),
            PiecesSource(raw),
            sink,
            position=None,
            since=None,
            follow=False,
            max_line_bytes=1 << 20,
            on_position=lambda _position: None,
            multiline=Joiner(PRESETS["java"], Limits(), None, time.monotonic),
        )

    asyncio.run(main())
    assert sorted(line.text for line in got) == sorted(
        [trace[0], trace[1], "between", "\n".join(trace[2:19]), trace[19]]
    )
    assert positions[-1] == Position(1_000 + len(trace) - 1, 1)
