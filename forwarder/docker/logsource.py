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
from collections.abc import AsyncIterator
from typing import NamedTuple, Protocol

from forwarder.docker.engine import Engine
from forwarder.docker.frames import (
    Demuxer,
    EngineStreamError,
    RawLine,
    TtyReader,
)
from forwarder.records import ContainerInfo, Position


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


class EngineLogSource:
    """Reads ``/containers/{id}/logs`` and parses the stream (multiplexed or TTY).

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
        parser: Demuxer | TtyReader = TtyReader() if container.tty else Demuxer()
        reads = self.engine.log_bytes(container.id, follow=follow, since=since)
        async with contextlib.aclosing(reads):
            async for data in reads:
                try:
                    lines = parser.feed(data)
                except EngineStreamError as exc:
                    if exc.lines:
                        yield RawBatch(exc.lines)
                    raise
                if lines:
                    yield RawBatch(lines)
        if isinstance(parser, TtyReader):
            tail = parser.flush()
            if tail:
                yield RawBatch(tail)
