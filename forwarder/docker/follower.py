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
from forwarder.docker.frames import PIECE_BYTES, EngineStreamError, PartialJoiner
from forwarder.docker.logsource import FileMark, LogSource, RawBatch
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
    """The position after taking ``lines``: the newest timestamp and how many lines at it
    (without a file part: :class:`FilePlace` adds it for a file source)."""
    ts, count = (position.ts_ns, position.taken) if position is not None else (-1, 0)
    for line in lines:
        if line.ts_ns > ts:
            ts, count = line.ts_ns, 1
        elif line.ts_ns == ts:
            count += 1
    return Position(ts, count) if ts >= 0 else None


class FilePlace:
    """Where a file source's position stands (sans-I/O): the last file offset at which the
    joiner held nothing, and how many joined lines came out since.

    A batch's lines are taken whole; a piece of a long line still pending in the joiner is
    not, so the offset stays before it, and the lines that came out after that offset are
    counted (``skip``): a resume seeks to the offset, joins the same bytes the same way and
    drops that many lines. After the source's ``resumed`` batch, the first ``position.skip``
    lines are dropped here too (:meth:`drop`)."""

    __slots__ = ("_drop", "_mark", "_out")

    def __init__(self) -> None:
        self._mark: FileMark | None = None
        self._out = 0
        self._drop = 0

    def resumed(self, position: Position) -> None:
        self._mark = FileMark(position.dev, position.ino, position.fingerprint, position.offset)
        self._out = 0
        self._drop = position.skip

    def moved(self, mark: FileMark, joined: list[LogLine], joiner_idle: bool) -> list[LogLine]:
        """The source reached ``mark`` and the joiner gave ``joined``; returns the lines not
        dropped by a resume."""
        if joiner_idle:
            self._mark, self._out = mark, 0
        else:
            self._out += len(joined)
        if self._drop:
            dropped = min(self._drop, len(joined))
            self._drop -= dropped
            joined = joined[dropped:]
        return joined

    def flushed(self, joined: list[LogLine]) -> list[LogLine]:
        """The joiner let go of what it held at the end of the stream."""
        if self._mark is None:
            return joined
        self._out += len(joined)
        dropped = min(self._drop, len(joined))
        self._drop -= dropped
        return joined[dropped:]

    def position(self, ts_position: Position) -> Position:
        m = self._mark
        if m is None:
            return ts_position
        return Position(
            ts_position.ts_ns, ts_position.taken, m.dev, m.ino, m.fingerprint, m.offset, self._out
        )


class _Intake:
    """A source's batches to whole new lines (sans-I/O): the joiner, the resume filter and,
    for a file source, where the file stands (:class:`FilePlace`)."""

    __slots__ = ("joiner", "place", "resume", "start")

    def __init__(
        self, start: Position | None, max_line_bytes: int, name: str, piece_bytes: int
    ) -> None:
        self.start = start
        self.joiner = PartialJoiner(max_line_bytes, _split_warner(name), piece_bytes=piece_bytes)
        self.resume = ResumeFilter(start)
        self.place = FilePlace()

    def take(self, batch: RawBatch) -> list[LogLine]:
        raw, mark, resumed = batch
        if resumed and self.start is not None:
            # At the position's byte: lines are dropped by count, not by time.
            self.resume = ResumeFilter(None)
            self.place.resumed(self.start)
        lines = self.joiner.feed(raw)
        if mark is not None:
            lines = self.place.moved(mark, lines, self.joiner.pending_bytes == 0)
        return self.resume.feed(lines) if self.resume.active else lines

    def flush(self) -> list[LogLine]:
        lines = self.place.flushed(self.joiner.flush())
        return self.resume.feed(lines) if self.resume.active else lines


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
    stopped: asyncio.Event | None = None,
    multiline: Joiner | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> None:
    """Read one container's log until the stream ends (the container stopped), handing each
    batch of lines to ``sink`` together with the position it reaches. ``piece_bytes`` is the
    joiner's (0: a partial piece always continues, as in the CRI format).

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
            stopped=stopped,
            piece_bytes=piece_bytes,
        )
        return
    intake = _Intake(position, max_line_bytes, container.name, piece_bytes)
    if position is not None:
        since = format_since(position.ts_ns)
    reads = source.read(container, since=since, follow=follow, position=position, stopped=stopped)
    try:
        async for batch in reads:
            lines = intake.take(batch)
            if lines:
                ts_position = advance(position, lines)
                assert ts_position is not None
                position = intake.place.position(ts_position)
                await sink(container, lines, position)
                on_position(position)
    finally:
        aclose = getattr(reads, "aclose", None)
        if aclose is not None:
            await aclose()  # a file source closes its files at once, even when cancelled
    lines = intake.flush()
    if lines:
        ts_position = advance(position, lines)
        assert ts_position is not None
        position = intake.place.position(ts_position)
        await sink(container, lines, position)
        on_position(position)


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
    stopped: asyncio.Event | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> None:
    """The loop of :func:`follow_container` with a multiline joiner. The positions it hands
    on are (timestamp, count) only: the one before a pending group's first line has no byte
    offset, so a file source resumes from it by time (it finds the line all the same)."""
    intake = _Intake(position, max_line_bytes, container.name, piece_bytes)
    start = position
    if position is not None:
        since = format_since(position.ts_ns)

    held: list[LogLine] = []

    async def send(records: list[LogLine], safe: Position | None) -> None:
        # Records whose safe position is not known yet (a group pending since before the
        # first position) wait for the next one: sent late, never dropped.
        held.extend(records)
        if held and safe is not None:
            batch = held[:]
            held.clear()
            await sink(container, batch, safe)
            on_position(safe)

    reads = aiter(
        source.read(container, since=since, follow=follow, position=start, stopped=stopped)
    )
    pending: asyncio.Future[RawBatch] | None = None
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
                lines = intake.take(task.result())
            except StopAsyncIteration:
                break
            if lines:
                position = advance(position, lines)
                await send(*multiline.feed(lines, position))
        lines = intake.flush()
        if lines:
            position = advance(position, lines)
            await send(*multiline.feed(lines, position))
        await send(*multiline.flush())
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(reads, "aclose", None)
        if aclose is not None:
            await aclose()


async def run_follower(
    start: Follow,
    *,
    engine: Inspector,
    source: LogSource,
    sink: LinesSink,
    max_line_bytes: int,
    stopped: asyncio.Event | None = None,
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
            stopped=stopped,
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
