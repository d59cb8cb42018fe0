"""Where a container's log comes from: the :class:`LogSource` interface and the Engine API.

A *log source* is anything that yields batches of :class:`RawLine` for a container from a
given point: the Engine API (:class:`EngineLogSource`) or the engine's json-file logs on disk
(:class:`forwarder.docker.filesource.JsonFileLogSource`). Parsing stays inside the source and
everything after it (joining, positions, records, output) is shared
(:mod:`forwarder.docker.follower`), so a container's records are the same whichever reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, NamedTuple, Protocol

from forwarder.docker.engine import Engine
from forwarder.docker.frames import (
    Demuxer,
    EngineStreamError,
    RawLine,
    TtyReader,
)
from forwarder.records import ContainerInfo, Position
from forwarder.timefmt import format_since


class FileMark(NamedTuple):
    """Where a file source stands in a file: its identity and the byte offset reached."""

    dev: int
    ino: int
    fingerprint: int
    """``-1`` while not known (the file's first line is not complete yet)."""
    offset: int


class RawBatch(NamedTuple):
    """A source's read: raw lines, and for a file source where the file stands after them."""

    lines: list[RawLine]
    mark: FileMark | None = None
    resumed: bool = False
    """Reading starts exactly at the position's file offset (so its ``skip`` applies and no
    line is dropped by time): said in the first batch, which holds no lines."""


REPLAY_MEMORY_LINES: Final = 1024
"""How many of the last taken timestamps of each stream :class:`ReplayFilter` remembers: a
replay the engine sends after a rotation goes back a few lines (9 in the runs measured)."""


class LogSource(Protocol):
    def read(
        self,
        container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None,
        stopped: asyncio.Event | None,
    ) -> AsyncIterator[RawBatch]:
        """Raw lines from ``since`` (the engine's inclusive ``since`` format) or ``position``
        on. With ``follow``, until the container stops (``stopped`` is set, or the stream
        ends) and every line it wrote was read."""
        ...


class _StreamState:
    __slots__ = ("counts", "last_ts", "left", "recent", "taken_at_last")

    def __init__(self) -> None:
        self.last_ts = -1
        self.taken_at_last = 0
        self.left = 0  # lines still to drop at last_ts while a replay is under way
        self.recent: deque[int] = deque()
        self.counts: dict[int, int] = {}

    def take(self, ts_ns: int) -> None:
        if ts_ns > self.last_ts:
            self.last_ts, self.taken_at_last = ts_ns, 1
        elif ts_ns == self.last_ts:
            self.taken_at_last += 1
        self.left = 0
        self.recent.append(ts_ns)
        self.counts[ts_ns] = self.counts.get(ts_ns, 0) + 1
        if len(self.recent) > REPLAY_MEMORY_LINES:
            old = self.recent.popleft()
            if self.counts[old] == 1:
                del self.counts[old]
            else:
                self.counts[old] -= 1


class ReplayFilter:
    """Drops the lines the engine sends a second time, per stream.

    Two cases, both of a request with ``follow``:

    - after a catch-up read (:meth:`seam`): the follow request's inclusive ``since`` repeats
      the lines at the catch-up's last timestamp;
    - while following across a rotation, this engine (20.10) sometimes sends the last few
      lines again (measured: 9 lines, once every few rotations).

    A stream's timestamps only go up (one copier stamps them), so a line older than the
    stream's last taken one, whose timestamp is among the stream's recent ones, starts a
    replay: it is dropped, and so are the following lines up to the last taken one (counted
    at that timestamp). A line older than the last one but not among the recent timestamps
    (the host's clock stepped back) is taken. Lines of one stream never suppress the other's.
    """

    __slots__ = ("_streams",)

    def __init__(self) -> None:
        self._streams: dict[str, _StreamState] = {}

    def seam(self) -> None:
        """The next lines repeat each stream's lines at its last timestamp (a new request
        with ``since`` at the last taken timestamp): drop as many as were taken there."""
        for state in self._streams.values():
            state.left = state.taken_at_last

    def feed(self, lines: list[RawLine]) -> list[RawLine]:
        kept: list[RawLine] = []
        for line in lines:
            state = self._streams.get(line.source)
            if state is None:
                state = self._streams[line.source] = _StreamState()
            ts = line.ts_ns
            if ts < state.last_ts and ts in state.counts:
                state.left = state.taken_at_last  # a replay: drop up to the last taken line
                continue
            if ts == state.last_ts and state.left > 0:
                state.left -= 1
                continue
            state.take(ts)
            kept.append(line)
        return kept


class EngineLogSource:
    """Reads ``/containers/{id}/logs`` and parses the stream (multiplexed or TTY).

    Following starts with a **catch-up** request without ``follow``, then follows from the
    last line it returned (``since`` at its timestamp, the repeated lines dropped by
    :class:`ReplayFilter`). On this engine (20.10) a request with ``follow`` reads the rotated
    files and then follows the file that was current when the request began: when the log
    rotates while the request is still sending its backlog, the lines of the file in between
    are skipped. The catch-up request has no such race, and it leaves the follow request a
    backlog of a few lines, which shrinks the window to the time the engine takes to skip the
    lines before ``since``.

    Bytes that can't be parsed raise :class:`EngineStreamError` (naming the stream offset)
    after the good lines of the same read have been yielded, so that they are taken and the
    position covers them; the stream is then read again from there by the caller."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def read(
        self,
        container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None = None,
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[RawBatch]:
        del position, stopped  # the engine ends the stream itself; ``since`` says where from
        replays = ReplayFilter()
        last_ts = -1
        async with contextlib.aclosing(self._request(container, since, follow=False)) as reads:
            async for lines in reads:
                if follow:
                    replays.feed(lines)  # all new: this only records them
                    last_ts = max(last_ts, max(line.ts_ns for line in lines))
                yield RawBatch(lines)
        if not follow:
            return
        if last_ts >= 0:
            since = format_since(last_ts)
            replays.seam()
        async with contextlib.aclosing(self._request(container, since, follow=True)) as reads:
            async for lines in reads:
                lines = replays.feed(lines)
                if lines:
                    yield RawBatch(lines)

    async def _request(
        self, container: ContainerInfo, since: str | None, *, follow: bool
    ) -> AsyncGenerator[list[RawLine], None]:
        parser: Demuxer | TtyReader = TtyReader() if container.tty else Demuxer()
        reads = self.engine.log_bytes(container.id, follow=follow, since=since)
        async with contextlib.aclosing(reads):
            async for data in reads:
                try:
                    lines = parser.feed(data)
                except EngineStreamError as exc:
                    if exc.lines:
                        yield exc.lines
                    raise
                if lines:
                    yield lines
        if isinstance(parser, TtyReader):
            tail = parser.flush()
            if tail:
                yield tail
