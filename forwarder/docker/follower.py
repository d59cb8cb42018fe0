"""A follower: one container's log read once through, handed on line by line, and its state
handed back at the end.

:func:`follow_container` joins the source's raw lines, drops those a saved position says were
taken, and hands each batch to the sink with the position it reaches. :func:`run_follower`
is one follower's task: it waits the backoff it was given, reads until the stream ends, and
returns what happened (:class:`~forwarder.docker.containers.FollowerEnded`); it never
decides whether the container is followed again: :mod:`forwarder.docker.containers` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from forwarder.docker.containers import EndReason, Follow, FollowerEnded
from forwarder.docker.engine import ContainerGoneError, EngineError, LogsUnsupportedError
from forwarder.docker.frames import EngineStreamError, PartialJoiner, RawLine
from forwarder.docker.logsource import LogSource
from forwarder.multiline import Joiner
from forwarder.records import ContainerInfo, LogLine, Position
from forwarder.timefmt import format_since

log = logging.getLogger(__name__)

LinesSink = Callable[[ContainerInfo, list[LogLine], Position], Awaitable[None]]


class Inspector(Protocol):
    """What a follower needs of :class:`forwarder.docker.engine.Engine` besides its log."""

    async def inspect(self, cid: str) -> ContainerInfo: ...


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
    multiline: Joiner | None = None,
) -> None:
    """Read one container's log until the stream ends (the container stopped), handing each
    batch of lines to ``sink`` together with the position it reaches.

    With ``multiline``, lines go through the joiner first, the position handed on is the one
    before its earliest pending group, and a pending group is sent after its flush_timeout
    (the loop wakes up for it)."""
    if multiline is not None:
        await _follow_joined(
            container,
            source,
            sink,
            position=position,
            since=since,
            follow=follow,
            max_line_bytes=max_line_bytes,
            on_position=on_position,
            multiline=multiline,
        )
        return
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


def _split_warner(name: str) -> Callable[[str, int], None]:
    def on_split(source_name: str, size: int) -> None:
        log.warning(
            "container %s: a %s line is longer than max_line_bytes; split after %d bytes",
            name,
            source_name,
            size,
        )

    return on_split


async def _follow_joined(
    container: ContainerInfo,
    source: LogSource,
    sink: LinesSink,
    *,
    position: Position | None,
    since: str | None,
    follow: bool,
    max_line_bytes: int,
    on_position: Callable[[Position], None],
    multiline: Joiner,
) -> None:
    joiner = PartialJoiner(max_line_bytes, _split_warner(container.name))
    resume = ResumeFilter(position)
    if position is not None:
        since = format_since(position.ts_ns)

    async def send(records: list[LogLine], safe: Position | None) -> None:
        if records and safe is not None:
            await sink(container, records, safe)
            on_position(safe)

    reads = aiter(source.read(container, since=since, follow=follow))
    pending: asyncio.Future[list[RawLine]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(reads))
            deadline = multiline.deadline()
            timeout = None if deadline is None else max(0.0, deadline - multiline.clock())
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if not done:
                await send(*multiline.due())
                continue
            task, pending = pending, None
            try:
                raw = task.result()
            except StopAsyncIteration:
                break
            lines = joiner.feed(raw)
            if resume.active:
                lines = resume.feed(lines)
            if lines:
                position = advance(position, lines)
                await send(*multiline.feed(lines, position))
        lines = resume.feed(joiner.flush())
        if lines:
            position = advance(position, lines)
            await send(*multiline.feed(lines, position))
        await send(*multiline.flush())
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


async def run_follower(
    start: Follow,
    *,
    engine: Inspector,
    source: LogSource,
    sink: LinesSink,
    max_line_bytes: int,
    multiline: Callable[[ContainerInfo, Position | None], Joiner | None] | None = None,
) -> FollowerEnded:
    """Follow ``start.container`` once through (after ``start.delay_s``): until the stream
    ends, then inspect it to say how it is. Every way it can end is returned, not raised."""
    container = start.container
    position = start.position

    def on_position(pos: Position) -> None:
        nonlocal position
        position = pos

    def ended(
        reason: EndReason, error: BaseException | None = None, after: ContainerInfo | None = None
    ) -> FollowerEnded:
        return FollowerEnded(container.cid, start.generation, reason, position, after, error)

    if start.delay_s > 0:
        await asyncio.sleep(start.delay_s)
    try:
        await follow_container(
            container,
            source,
            sink,
            position=start.position,
            since=format_since(start.since_ns) if start.since_ns is not None else None,
            follow=container.running,
            max_line_bytes=max_line_bytes,
            on_position=on_position,
            multiline=multiline(container, start.position) if multiline is not None else None,
        )
        # The stream ended: the container stopped, or the engine went away.
        return ended(EndReason.STOPPED, after=await engine.inspect(container.cid))
    except LogsUnsupportedError as exc:
        return ended(EndReason.UNSUPPORTED, exc)
    except ContainerGoneError:
        return ended(EndReason.GONE)
    except EngineError as exc:
        return ended(EndReason.BROKE, exc)
    except EngineStreamError as exc:
        return ended(EndReason.CORRUPT, exc)
    except Exception as exc:
        return ended(EndReason.FAILED, exc)
