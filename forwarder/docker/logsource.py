"""Where a container's log comes from: the :class:`LogSource` interface and the Engine API.

A *log source* is anything that yields batches of :class:`RawLine` for a container from a
given point: today the Engine API (:class:`EngineLogSource`); a source reading the engine's
json-file logs from disk can slot in beside it, since parsing the API stream stays inside the
source and everything after it (joining, positions, records, output) is shared
(:mod:`forwarder.docker.follower`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from forwarder.docker.engine import Engine
from forwarder.docker.frames import (
    Demuxer,
    EngineStreamError,
    RawLine,
    TtyReader,
)
from forwarder.records import ContainerInfo


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
