"""The json-file log source: a container's log read straight from the engine's files on disk.

:class:`JsonFileLogSource` reads ``<id>-json.log`` and its rotated siblings (``.1``, ``.2``,
``.N.gz``) with :class:`~forwarder.tail.FileTailer` and parses them with
:class:`~forwarder.docker.jsonfile.JsonFileParser`; joining, positions and records are the
follower's (:mod:`forwarder.docker.follower`), the same as for the API source, so a container
ships the same records whichever source reads it.

Each batch says where the file stands after it (:class:`~forwarder.docker.logsource.FileMark`),
which the follower turns into a byte-exact position. A saved position with a file part is
resumed at its byte when its file is still there (as it was, renamed, or gzipped); otherwise
the chain is read from its oldest file and the follower drops what the position's
``(ts_ns, taken)`` says was taken. A file that rotated away before it was read is named in a
warning, with the time range lost, and counted (:attr:`JsonFileLogSource.rotation_gaps`).

The source ends when the chain is gone and the open file was read (the container was
removed), when ``follow`` is off and everything was read, or, following, once ``stopped`` is
set (the container died: the engine has written its last line) and everything was read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol

from forwarder.docker.jsonfile import Garbled, JsonFileParser
from forwarder.docker.logsource import FileMark, RawBatch
from forwarder.records import ContainerInfo, Position, RawLine
from forwarder.tail import (
    Block,
    Ended,
    FileRef,
    FileTailer,
    Gap,
    JsonFileNaming,
    Naming,
    Opened,
    TailPosition,
    Watcher,
    wait_first,
)
from forwarder.timefmt import format_time

log = logging.getLogger(__name__)

READ_BUDGET_BYTES = 1 << 20
"""Read at most this much of a file before handing the lines on (and letting others run)."""


class ParsedBlock(Protocol):
    @property
    def lines(self) -> list[RawLine]: ...
    @property
    def end_offset(self) -> int: ...
    @property
    def garbled(self) -> Sequence[Garbled]: ...


class LineParser(Protocol):
    """A sans-I/O parser of a log file format: blocks in, raw lines out."""

    def feed(self, data: bytes) -> ParsedBlock: ...
    def flush(self) -> ParsedBlock: ...


def log_file_path(log_path: str, containers_dir: str) -> Path:
    """Where the engine's ``LogPath`` is seen from here: ``<data-root>/containers/<id>/<file>``
    mapped under ``containers_dir`` when it is set, else as it is."""
    if not containers_dir:
        return Path(log_path)
    parts = PurePosixPath(log_path).parts
    return Path(containers_dir, *parts[-2:])


def _tail_position(position: Position | None) -> TailPosition | None:
    if position is None or not position.in_file:
        return None
    fp = position.fingerprint if position.fingerprint >= 0 else None
    return TailPosition(position.dev, position.ino, fp, position.offset)


class JsonFileLogSource:
    """Reads containers' json-file logs from disk (see the module docstring)."""

    kind = "file"

    def __init__(self, containers_dir: str = "", *, poll_interval_s: float = 1.0) -> None:
        self.containers_dir = containers_dir
        self.poll_interval_s = poll_interval_s
        self.rotation_gaps = 0
        """Times lines rotated away before they could be read (each one is logged)."""
        self.garbled_lines = 0

    def path_of(self, container: ContainerInfo) -> Path:
        return log_file_path(container.log_path, self.containers_dir)

    def naming(self, name: str) -> Naming:
        """Which files of the directory are the chain of the current file ``name``."""
        return JsonFileNaming(name)

    def _reader(self, container: ContainerInfo, position: Position | None) -> _Reader:
        return _Reader(self, container, position)

    def readable(self, container: ContainerInfo) -> bool:
        """Its log file can be opened from here (I/O: for discovery to tell the table)."""
        return bool(container.log_path) and os.access(self.path_of(container), os.R_OK)

    async def read(
        self,
        container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None,
        stopped: asyncio.Event | None,
    ) -> AsyncIterator[RawBatch]:
        del since  # the follower drops lines by the position's time, which is since's
        reader = self._reader(container, position)
        path = self.path_of(container)
        tailer = FileTailer(path.parent, self.naming(path.name), _tail_position(position))
        watcher: Watcher | None = None
        try:
            while True:
                events = tailer.read(READ_BUDGET_BYTES)
                if events:
                    for batch in reader.take(events, tailer):
                        yield batch
                    continue
                if tailer.ended or not follow or (stopped is not None and stopped.is_set()):
                    break
                if watcher is None:
                    # Lists the directory only when it may have changed from here on.
                    watcher = tailer.changes = Watcher(tailer.directory, self.poll_interval_s)
                await _wait(watcher, stopped)
            reader.finish()
        finally:
            if watcher is not None:
                watcher.close()
            tailer.close()


async def _wait(watcher: Watcher, stopped: asyncio.Event | None) -> None:
    """Until the directory changed, the poll interval passed, or the container stopped."""
    if stopped is None:
        await watcher.wait()
        return
    await wait_first(watcher.wait(), stopped.wait())


class _Reader:
    """One read of a container's chain: tailer events -> :class:`RawBatch` es."""

    def __init__(
        self, source: JsonFileLogSource, container: ContainerInfo, position: Position | None
    ) -> None:
        self.source = source
        self.container = container
        self.position = position
        self.parser = self.new_parser(0)
        self.ref: FileRef | None = None
        self.name = ""
        self.started = False
        self.last_ts_ns = position.ts_ns if position is not None else None
        self.gap_after: int | bool | None = False  # False: no gap pending

    format_name = "the engine's json-file format"

    def new_parser(self, offset: int) -> LineParser:
        return JsonFileParser(offset, tty=self.container.tty)

    def take(self, events: Sequence[object], tailer: FileTailer) -> list[RawBatch]:
        batches: list[RawBatch] = []
        resumed = False
        for event in events:
            if isinstance(event, Block):
                chunk = self.parser.feed(event.data)
                if chunk.garbled:
                    self._garbled(chunk.garbled)
                if chunk.lines:
                    self._saw(chunk.lines)
                batches.append(RawBatch(chunk.lines, self._mark(tailer, chunk.end_offset)))
            elif isinstance(event, Opened):
                if self.ref is not None:
                    self._garbled(self.parser.flush().garbled)
                elif self.position is not None and self.gap_after is False:
                    tp = _tail_position(self.position)
                    resumed = (
                        tp is not None and event.ref.same_file(tp.ref) and event.offset == tp.offset
                    )
                self.parser = self.new_parser(event.offset)
                self.ref, self.name = event.ref, event.name
                if resumed:
                    batches.append(RawBatch([], self._mark(tailer, event.offset), resumed=True))
                    resumed = False
            elif isinstance(event, Gap):
                self.source.rotation_gaps += 1
                self.gap_after = self.last_ts_ns
            elif isinstance(event, Ended):
                self._garbled(self.parser.flush().garbled)
        return batches

    def finish(self) -> None:
        if self.gap_after is not False:
            self._report_gap(None)

    def _mark(self, tailer: FileTailer, offset: int) -> FileMark:
        ref = self.ref
        assert ref is not None
        if ref.fingerprint is None:  # learnt by the tailer once the first line is complete
            now = tailer.position()
            if now is not None and (now.dev, now.ino) == (ref.dev, ref.ino) and now.fingerprint:
                ref = self.ref = FileRef(ref.dev, ref.ino, now.fingerprint)
        fp = ref.fingerprint if ref.fingerprint is not None else -1
        return FileMark(ref.dev, ref.ino, fp, offset)

    def _saw(self, lines: list[RawLine]) -> None:
        if self.gap_after is not False:
            self._report_gap(lines[0].ts_ns)
        self.last_ts_ns = lines[-1].ts_ns

    def _report_gap(self, before_ns: int | None) -> None:
        after = self.gap_after
        self.gap_after = False
        since = format_time(after) if isinstance(after, int) else "its start"
        until = format_time(before_ns) if before_ns is not None else "now"
        log.warning(
            "container %s (%s): log lines from %s to %s were rotated away before they could "
            "be read; they are lost (counted in rotation_gaps)",
            self.container.name,
            self.container.cid[:12],
            since,
            until,
        )

    def _garbled(self, garbled: Sequence[Garbled]) -> None:
        for bad in garbled:
            self.source.garbled_lines += 1
            log.warning(
                "container %s: skipped a line of %s at byte %d that is not in %s (%s): %r",
                self.container.name,
                self.name,
                self.format_name,
                bad.offset,
                bad.reason,
                bad.excerpt,
            )
