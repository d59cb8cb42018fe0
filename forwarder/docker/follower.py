"""One container's log: a source of raw lines, joined, filtered by position, handed on.

A *log source* is anything that yields batches of :class:`RawLine` for a container from a
given point: today the Engine API (:class:`EngineLogSource`); a source reading the engine's
json-file logs from disk can slot in beside it, since parsing the API stream stays inside the
source and everything after it (joining, positions, records, output) is shared.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from forwarder.docker.engine import Engine
from forwarder.docker.frames import (
    Demuxer,
    EngineStreamError,
    LogLine,
    PartialJoiner,
    RawLine,
    TtyReader,
)
from forwarder.records import ContainerInfo, Position
from forwarder.timefmt import format_since

log = logging.getLogger(__name__)


class LogSource(Protocol):
    def read(
        self, container: ContainerInfo, *, since: str | None, follow: bool
    ) -> AsyncIterator[list[RawLine]]:
        """Raw lines from ``since`` (the engine's inclusive ``since`` format) on."""
        ...


class EngineLogSource:
    """Reads ``/containers/{id}/logs`` and parses the stream (multiplexed or TTY).

    Bytes that can't be parsed raise :class:`EngineStreamError` (naming the stream offset)
    after the good lines of the same read have been yielded, so that they are taken and the
    position covers them; the stream is then read again from there by the caller."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def read(
        self, container: ContainerInfo, *, since: str | None, follow: bool
    ) -> AsyncIterator[list[RawLine]]:
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


class ResumeFilter:
    """Drops the lines a saved position says were already taken.

    The engine's ``since`` is inclusive, so a resumed stream starts with every line at the
    position's nanosecond; ``count`` of those were taken before and are skipped here."""

    __slots__ = ("_left", "_ts")

    def __init__(self, position: Position | None) -> None:
        self._ts = position.ts_ns if position else -1
        self._left = position.taken if position else 0

    @property
    def active(self) -> bool:
        return self._ts >= 0

    def feed(self, lines: list[LogLine]) -> list[LogLine]:
        if self._ts < 0:
            return lines
        ts = self._ts
        for index, line in enumerate(lines):
            if line.ts_ns < ts:
                continue
            if line.ts_ns == ts and self._left > 0:
                self._left -= 1
                continue
            # The first line past the position: everything from here on is new.
            self._ts = -1
            return lines[index:]
        return []


def advance(position: Position | None, lines: list[LogLine]) -> Position | None:
    """The position after taking ``lines``: the newest timestamp and how many lines at it."""
    ts, count = position if position is not None else (-1, 0)
    for line in lines:
        if line.ts_ns > ts:
            ts, count = line.ts_ns, 1
        elif line.ts_ns == ts:
            count += 1
    return Position(ts, count) if ts >= 0 else None


LinesSink = Callable[[ContainerInfo, list[LogLine], Position], Awaitable[None]]


async def follow_container(
    container: ContainerInfo,
    source: LogSource,
    sink: LinesSink,
    *,
    position: Position | None,
    since: str | None,
    follow: bool,
    max_line_bytes: int,
    on_position: Callable[[Position], None],
) -> None:
    """Read one container's log until the stream ends (the container stopped), handing each
    batch of lines to ``sink`` together with the position it reaches."""
    name = container.name

    def on_split(source_name: str, size: int) -> None:
        log.warning(
            "container %s: a %s line is longer than max_line_bytes; split after %d bytes",
            name,
            source_name,
            size,
        )

    joiner = PartialJoiner(max_line_bytes, on_split)
    resume = ResumeFilter(position)
    if position is not None:
        since = format_since(position.ts_ns)
    async for raw in source.read(container, since=since, follow=follow):
        lines = joiner.feed(raw)
        if resume.active:
            lines = resume.feed(lines)
        if lines:
            new_position = advance(position, lines)
            assert new_position is not None
            position = new_position
            await sink(container, lines, position)
            on_position(position)
    lines = resume.feed(joiner.flush())
    if lines:
        new_position = advance(position, lines)
        assert new_position is not None
        await sink(container, lines, new_position)
        on_position(new_position)
