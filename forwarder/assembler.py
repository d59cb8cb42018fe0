"""The chunk assembler: the sink every source writes to. Entries in, sealed chunks into the
buffer, each registered with the position tracker in the order it was sealed.

A batch of log lines larger than ``chunk_limit`` is cut into parts that fit in a chunk, each
with the position it reaches. The :class:`~forwarder.chunks.Chunker` seals a chunk when it is
full or has waited ``flush_interval``; the flusher here also seals as soon as the input goes
quiet (``QUIET_S``, :mod:`forwarder.tuning`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from forwarder import tuning
from forwarder.buffer import ChunkBuffer
from forwarder.checkpoint import PositionTracker
from forwarder.chunks import Chunk, Chunker
from forwarder.config import Config
from forwarder.docker.follower import advance
from forwarder.forward.protocol import LogHead, encode_entries, encode_log_entries, log_head
from forwarder.metadata import record_extra
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position, RecordKind
from forwarder.tags import compile_template

ENTRY_OVERHEAD_BYTES = 64
"""About what one log entry takes besides its text, its container's id and its name, as
:func:`~forwarder.forward.protocol.encode_log_entries` encodes it (the time, the map and its
keys, the stream, the strings' headers: 62 to 66 bytes): the estimate that cuts a batch into
parts that fit in a chunk."""


class ChunkAssembler:
    """The sink every source writes to: entries in, sealed chunks into the buffer."""

    def __init__(self, config: Config, buffer: ChunkBuffer, tracker: PositionTracker) -> None:
        out = config.output
        self.config = config
        self.buffer = buffer
        self.tracker = tracker
        self.chunker = Chunker(
            chunk_limit=out.chunk_limit,
            flush_interval_s=out.flush_interval.total_seconds(),
            require_ack=out.require_ack or out.mode == "stdout",
            compress=out.compress == "gzip",
        )
        self._log_tag = compile_template(config.tags.logs)
        self._tags: dict[ContainerId, str] = {}
        self._heads: dict[ContainerId, LogHead] = {}
        self.host = ""
        """The engine's name, for the ``host`` extra key (discovery learns it)."""
        self._added = asyncio.Event()
        self._clock = time.monotonic
        # Sealed chunks on their way into the buffer: a sealed chunk is out of the chunker,
        # so a put cut short by a cancellation (a follower or the flusher stopped at
        # shutdown) would leave it nowhere, its position never committed.
        self._putting: set[asyncio.Future[None]] = set()
        self.records_in: dict[RecordKind, int] = {"log": 0, "stats": 0, "lifecycle": 0}
        self.bytes_in: dict[RecordKind, int] = {"log": 0, "stats": 0, "lifecycle": 0}

    def log_tag(self, container: ContainerInfo) -> str:
        tag = self._tags.get(container.cid)
        if tag is None:
            tag = self._tags[container.cid] = self._log_tag(container)
        return tag

    def log_head(self, container: ContainerInfo) -> LogHead:
        """The container's constant part of every log entry, its extra keys included: packed
        once per container, not per batch nor per line."""
        head = self._heads.get(container.cid)
        if head is None:
            extra = record_extra(container, self.config.records, self.host)
            head = self._heads[container.cid] = log_head(container.id, container.name, extra)
        return head

    def set_host(self, name: str) -> None:
        self.host = name
        self._heads.clear()

    def forget(self, cid: ContainerId) -> None:
        self._tags.pop(cid, None)
        self._heads.pop(cid, None)

    async def add_lines(
        self, container: ContainerInfo, lines: list[LogLine], position: Position
    ) -> None:
        self.records_in["log"] += len(lines)
        tag = self.log_tag(container)
        limit = self.config.output.chunk_limit
        head = self.log_head(container)
        extra_bytes = len(head.tail) + (len(head.log) if head.log is not None else 0)
        for part, part_position in split_batch(container, lines, position, limit, extra_bytes):
            entries = encode_log_entries(container.id, container.name, part, head=head)
            await self._add(tag, entries, len(part), (container.cid, part_position), "log")

    async def add_mapped_lines(
        self,
        cid: ContainerId,
        tag: str,
        lines: list[LogLine],
        position: Position,
        to_record: Callable[[LogLine], dict[str, Any]],
    ) -> None:
        """Log lines whose records ``to_record`` makes (a source with its own record shape,
        such as the Kubernetes one), each part of the batch with the position it reaches."""
        self.records_in["log"] += len(lines)
        limit = self.config.output.chunk_limit
        overhead = len(repr(to_record(LogLine("stdout", 0, "")))) + ENTRY_OVERHEAD_BYTES
        for part, part_position in split_lines(lines, position, limit, overhead):
            entries = encode_entries([(line.ts_ns, to_record(line)) for line in part])
            await self._add(tag, entries, len(part), (cid, part_position), "log")

    async def add_stats(self, tag: str, records: list[tuple[int, dict[str, Any]]]) -> None:
        await self.add_records(tag, records, "stats")

    async def add_records(
        self, tag: str, records: list[tuple[int, dict[str, Any]]], kind: RecordKind
    ) -> None:
        self.records_in[kind] += len(records)
        await self._add(tag, encode_entries(records), len(records), None, kind)

    async def _add(
        self,
        tag: str,
        entries: bytes,
        count: int,
        position: tuple[ContainerId, Position] | None,
        kind: RecordKind,
    ) -> None:
        self.bytes_in[kind] += len(entries)
        sealed = self.chunker.add(tag, entries, count, self._clock(), position, kind)
        self._added.set()
        await self._put(sealed)

    async def _put(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        # Register every chunk before the first await, so positions commit in sealing order.
        for chunk in chunks:
            assert chunk.seq is not None  # sealed in this run
            self.tracker.sealed(chunk.seq, chunk.positions)
        # The puts go on when the caller is cancelled: they finish in the background and
        # flush() waits for them.
        putting = asyncio.ensure_future(self._put_all(chunks))
        self._putting.add(putting)
        putting.add_done_callback(self._putting.discard)
        await asyncio.shield(putting)

    async def _put_all(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            await self.buffer.put(chunk)

    async def flush(self) -> None:
        """Seal every open chunk and put it in the buffer, after the puts still under way."""
        await self._put(self.chunker.flush_all())
        while self._putting:
            await asyncio.gather(*self._putting, return_exceptions=True)

    async def run_flusher(self) -> None:
        """Seal chunks when the input goes quiet, or when one has waited flush_interval."""
        while True:
            await self._added.wait()
            while True:
                self._added.clear()
                deadline = self.chunker.next_deadline()
                if deadline is None:
                    break
                wait = min(tuning.QUIET_S, max(0.0, deadline - self._clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._added.wait()
                if not self._added.is_set():
                    await self.flush()  # quiet
                    break
                await self._put(self.chunker.due(self._clock()))


def split_batch(
    container: ContainerInfo,
    lines: list[LogLine],
    position: Position,
    limit: int,
    extra_bytes: int = 0,
) -> list[tuple[list[LogLine], Position]]:
    """Cut a batch (one engine read can hold a thousand lines) into parts that fit in a
    chunk of ``limit`` bytes, each with the position it reaches. An inner part's count at
    its last nanosecond ignores earlier parts, so it can only be lower: a resume from it
    repeats a line rather than skipping one.

    An inner part's position has no file part (a file source's ``dev``/``ino``/``offset``),
    so a resume from it (only when forwarder stopped after an inner part was acked and before
    the last one was: that one carries the batch's whole position) finds its place by time,
    reading the chain from its oldest file. It can't be derived from the batch's position:
    that one's offset is the end of the batch's bytes (where the joiner last held nothing,
    most often after the last line) and its ``skip`` counts only the lines after that offset.
    Exact inner positions need the position the batch started from (the file's offset before
    it and the lines taken since), which the sink is not given: the part ending at the batch's
    ``k``-th line would be that offset with ``skip + k``, when the batch continues the same
    file."""
    overhead = ENTRY_OVERHEAD_BYTES + len(container.id) + len(container.name) + extra_bytes
    return split_lines(lines, position, limit, overhead)


def split_lines(
    lines: list[LogLine], position: Position, limit: int, overhead: int
) -> list[tuple[list[LogLine], Position]]:
    """:func:`split_batch` with the bytes each entry takes besides its text."""
    if len(lines) * overhead + sum(len(line.text) for line in lines) <= limit:
        return [(lines, position)]
    parts: list[tuple[list[LogLine], Position]] = []
    start, size = 0, 0
    for index, line in enumerate(lines):
        size += overhead + len(line.text)
        if size > limit and index > start:
            part = lines[start:index]
            part_position = advance(None, part)
            assert part_position is not None
            parts.append((part, part_position))
            start, size = index, overhead + len(line.text)
    parts.append((lines[start:], position))
    return parts
