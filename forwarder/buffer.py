"""The buffer between the chunker and the output: memory, and disk when it matters.

Chunks are held in memory while the aggregator keeps up. They go to append-only segment files
under ``[state] dir``/buffer (:mod:`forwarder.segments`) when

- the output stalls (no server is healthy): the chunk in flight and everything queued are
  written out, and new chunks follow them to disk until the backlog is delivered, so that the
  order stays oldest first;
- the memory queue is over ``[output] buffer_limit``;
- ``[buffer] mode = "always"``: every chunk, before it is sent;
- the collector stops with chunks undelivered.

A chunk written to disk is *durable*: ``on_durable`` lets its positions commit, because a
restart will replay it. On start the disk backlog from the last run is queued first.

A delivered chunk is released on disk by a release record (:mod:`forwarder.segments`). The
records are written as soon as the releases come, one write and fsync for all that came
meanwhile, not lazily with the next chunk appended: after a backlog drains no chunk may be
appended for hours, and a crash would then send the whole backlog again. The chunks that are
delivered but not yet recorded as such, which a crash sends again, are capped by design at
``UNRECORDED_RELEASES`` (:mod:`forwarder.tuning`): the output takes no further chunk from disk
while that many wait.

When the disk is full too, ``[buffer] overflow`` decides: ``"block"`` makes ``put`` wait (the
followers pause, and the engine's log files hold the data); ``"drop_oldest"`` drops the oldest
chunk on disk and counts and logs it. Nothing is dropped any other way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

from forwarder import tuning
from forwarder.chunks import Chunk
from forwarder.segments import BufferFullError, CorruptChunkError, Damage, SegmentStore

log = logging.getLogger(__name__)


class ChunkBuffer:
    """Bounded queue of sealed chunks; ``store=None`` keeps it in memory only."""

    def __init__(
        self,
        memory_limit: int,
        *,
        store: SegmentStore | None = None,
        always_disk: bool = False,
        drop_oldest: bool = False,
        on_durable: Callable[[Chunk], None] | None = None,
    ) -> None:
        self.memory_limit = memory_limit
        self.store = store
        self.always_disk = always_disk and store is not None
        self.drop_oldest = drop_oldest
        self.on_durable = on_durable
        self._memory: deque[Chunk] = deque()
        # Durable on disk; a chunk's payload stays loaded while memory allows, else it is
        # read back when the chunk is due.
        self._disk: deque[Chunk] = deque()
        self._held = 0  # payload bytes in memory: queued, cached for disk entries, in flight
        self._stalled = False
        self._changed = asyncio.Condition()
        self._pending: list[tuple[Chunk, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        # The append the writer is in: shielded, so that a shutdown waits for it to finish
        # (and commit its positions) rather than cancel it half done.
        self._step: asyncio.Future[bool] | None = None
        self._releases = 0  # deliveries so far: each may free disk room
        self._unrecorded = 0  # disk chunks released, their release record not written yet
        self._recorder: asyncio.Task[None] | None = None
        self.waiting_puts = 0
        self.dropped_chunks = 0
        self.dropped_records = 0
        self.lost_corrupt = 0

    def __repr__(self) -> str:
        return (
            f"<ChunkBuffer memory={len(self._memory)} disk={len(self._disk)} "
            f"held={self._held}/{self.memory_limit} stalled={self._stalled}>"
        )

    # --- state ----------------------------------------------------------------------------

    @property
    def bytes_held(self) -> int:
        return self._held

    @property
    def queued(self) -> int:
        return len(self._memory) + len(self._disk) + len(self._pending)

    @property
    def unrecorded_releases(self) -> int:
        """Delivered disk chunks whose release is not written yet: a crash sends them again."""
        return self._unrecorded

    @property
    def disk_chunks(self) -> int:
        return len(self._disk)

    @property
    def disk_chunk_bytes(self) -> int:
        """Payload bytes of the chunks queued on disk (``disk_chunks``)."""
        return sum(chunk.size for chunk in self._disk)

    @property
    def disk_bytes(self) -> int:
        """The segment files' size: delivered chunks count until their segment is deleted,
        which happens once a newer segment has started, or at shutdown."""
        return self.store.bytes_used if self.store else 0

    def _memory_full_for(self, size: int) -> bool:
        # An oversized chunk may enter an empty buffer, or it could never enter at all.
        return self._held > 0 and self._held + size > self.memory_limit

    def _goes_to_disk(self, size: int) -> bool:
        return (
            self.store is not None
            and size < self.store.max_bytes // 2
            and (
                self.always_disk
                or self._stalled
                or bool(self._disk)
                or bool(self._pending)
                or self._memory_full_for(size)
            )
        )

    # --- start ----------------------------------------------------------------------------

    async def open(self) -> list[Damage]:
        """Recover the disk backlog of the last run, queued oldest first."""
        if self.store is None:
            return []
        chunks, damage = await asyncio.to_thread(self.store.recover)
        self._disk.extend(chunks)
        return damage

    # --- in -------------------------------------------------------------------------------

    async def put(self, chunk: Chunk) -> None:
        """Queue a chunk. Without a disk buffer, waits while memory is full; with one, the
        chunk goes to disk instead, and waits only while the disk is full too."""
        async with self._changed:
            if not self._goes_to_disk(chunk.size):
                if self._memory_full_for(chunk.size):
                    self.waiting_puts += 1
                    try:
                        await self._changed.wait_for(lambda: not self._memory_full_for(chunk.size))
                    finally:
                        self.waiting_puts -= 1
                self._memory.append(chunk)
                self._held += chunk.size
                self._changed.notify_all()
                return
        await self._write(chunk)

    async def _write(self, chunk: Chunk) -> None:
        """Make a chunk durable on disk, then queue it there. Concurrent callers share one
        write and one fsync (group commit)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((chunk, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="buffer writer")
        await future

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                if await self._append_step(batch):
                    continue
                # Not all fit: one by one, so that a full disk holds back only what doesn't
                # fit, and what is written can be sent (and free room) meanwhile.
                for item in batch:
                    while not await self._append_step([item]):
                        await self._make_room()
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    async def _append_step(self, batch: list[tuple[Chunk, asyncio.Future[None]]]) -> bool:
        """Append a batch and queue it on disk, as one step that a cancellation of the writer
        does not cut in two: the thread's write can't be called back, so the chunks it wrote
        must also be queued and their positions committed, or a restart sends them twice."""

        async def step() -> bool:
            if not await self._try_append([chunk for chunk, _ in batch]):
                return False
            await self._written(batch)
            return True

        self._step = current = asyncio.ensure_future(step())
        try:
            done = await asyncio.shield(current)
        finally:
            if current.done() and self._step is current:
                self._step = None
        async with self._changed:
            self._changed.notify_all()  # wait_safe() looks at _step
        return done

    async def _written(self, batch: list[tuple[Chunk, asyncio.Future[None]]]) -> None:
        async with self._changed:
            self._queue_on_disk([chunk for chunk, _ in batch])
        for chunk, future in batch:
            if self.on_durable is not None:
                self.on_durable(chunk)
            if not future.done():
                future.set_result(None)

    async def _try_append(self, chunks: list[Chunk]) -> bool:
        """Write chunks to disk if they fit under ``max_bytes``; never waits for room."""
        assert self.store is not None
        try:
            await asyncio.to_thread(self.store.append_many, chunks)
        except BufferFullError:
            return False
        return True

    def _queue_on_disk(self, chunks: list[Chunk], *, front: bool = False) -> None:
        """Called with the lock held, after the chunks are durable."""
        entries = []
        for chunk in chunks:
            if not chunk.stored:
                chunk.stored = True
                if self._memory_full_for(chunk.size):
                    entries.append(chunk.without_payload())
                    continue
                self._held += chunk.size
            entries.append(chunk)
        if front:
            self._disk.extendleft(reversed(entries))
        else:
            self._disk.extend(entries)
        self._changed.notify_all()

    async def _make_room(self) -> None:
        """The disk is full: drop the oldest chunk (opt-in), or wait for a delivery."""
        assert self.store is not None
        if self.drop_oldest:
            dropped = self.store.drop_oldest(collect=False)  # the retried append deletes
            if dropped is not None:
                async with self._changed:
                    for queued in self._disk:
                        if queued.chunk_id == dropped.chunk_id:
                            self._disk.remove(queued)
                            if queued.is_loaded:
                                self._held -= queued.size
                            break
                self.dropped_chunks += 1
                self.dropped_records += dropped.count
                log.warning(
                    "disk buffer full (%d bytes): dropped the oldest chunk, %d records tagged "
                    "%s (dropped so far: %d chunks, %d records)",
                    self.store.max_bytes,
                    dropped.count,
                    dropped.tag,
                    self.dropped_chunks,
                    self.dropped_records,
                )
                return
        # Any release may make room (the store retires an emptied segment on the next
        # append), so wait for one and let the caller try again.
        releases = self._releases
        self.waiting_puts += 1
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: self._releases != releases)
        finally:
            self.waiting_puts -= 1

    # --- out ------------------------------------------------------------------------------

    def _can_get(self) -> bool:
        if self._disk:
            return self._unrecorded < tuning.UNRECORDED_RELEASES
        return bool(self._memory)

    async def get(self) -> Chunk:
        """The oldest chunk: the disk backlog first, then memory. A chunk from disk waits
        while too many delivered ones are not yet recorded as released."""
        while True:
            async with self._changed:
                await self._changed.wait_for(self._can_get)
                if not self._disk:
                    return self._memory.popleft()
                queued = self._disk.popleft()
            if queued.is_loaded:
                return queued
            try:
                chunk = await self._read(queued)
            except asyncio.CancelledError:
                self._disk.appendleft(queued)  # still first in line
                raise
            if chunk is not None:
                self._held += chunk.size
                return chunk

    async def _read(self, chunk: Chunk) -> Chunk | None:
        """``chunk`` with its payload read back from disk; None if it is gone."""
        assert self.store is not None
        try:
            stored = await asyncio.to_thread(self.store.read, chunk.chunk_id)
        except KeyError:
            return None  # dropped meanwhile
        except CorruptChunkError as exc:
            self.lost_corrupt += chunk.count
            log.error("disk buffer: a chunk of %d records can't be read back: %s", chunk.count, exc)
            return None
        return chunk.with_payload(stored.payload)

    async def stall(self, chunk: Chunk) -> None:
        """No server can take ``chunk`` now. It stays first in line; with a disk buffer it
        and everything queued in memory are written out, and new chunks follow them to disk
        until the backlog is delivered. Never waits for disk room: what doesn't fit stays in
        memory."""
        async with self._changed:
            if self.store is None:
                self._memory.appendleft(chunk)
                self._changed.notify_all()
                return
            self._stalled = True
            if chunk.stored:
                self._disk.appendleft(chunk)
                self._changed.notify_all()
                spill = list(self._memory)
            else:
                spill = [chunk, *self._memory]
            self._memory.clear()
        if spill and await self._try_append(spill):
            async with self._changed:
                self._held -= sum(c.size for c in spill)
                self._queue_on_disk(spill, front=not chunk.stored)
            if self.on_durable is not None:
                for spilled in spill:
                    self.on_durable(spilled)
            return
        async with self._changed:  # the disk is full: keep them in memory, in order
            self._memory.extendleft(reversed(spill))
            self._changed.notify_all()

    def recovered(self) -> None:
        """A delivery went through: new chunks may stay in memory again."""
        self._stalled = False

    async def done(self, chunk: Chunk) -> None:
        """The chunk is delivered: release its bytes and its place on disk."""
        async with self._changed:
            self._held -= chunk.size
            self._releases += 1
            # Also when not marked stored yet: an ack can beat the chunk's own disk write
            # (mode "always"), and the store keeps such an early release.
            # The segment this may empty is deleted by the release records' write, off the
            # loop.
            if self.store is not None and self.store.release(chunk.chunk_id, collect=False):
                self._unrecorded += 1
                if self._recorder is None or self._recorder.done():
                    self._recorder = asyncio.create_task(
                        self._record_releases(), name="buffer releases"
                    )
            self._changed.notify_all()

    def _empty(self) -> bool:
        return self._held == 0 and not self._disk and not self._memory

    def _all_on_disk(self) -> bool:
        """No server took a chunk since the last stall, and everything queued is durable on
        disk (the output holds nothing while it waits for a server): a restart replays it."""
        return self._stalled and not self._memory and not self._pending and self._step is None

    async def _record_releases(self) -> None:
        """Writes release records while there are releases to write: each write takes all
        that came during the one before."""
        assert self.store is not None
        while self._unrecorded:
            count = self._unrecorded
            try:
                await asyncio.to_thread(self.store.persist_releases)
            except Exception as exc:
                # They stay pending in the store and ride the next append (or the close):
                # delivered chunks may be sent again after a crash, never lost. The output
                # must not wait for them meanwhile.
                log.warning("disk buffer: can't write release records: %s", exc)
                count = self._unrecorded
            async with self._changed:
                self._unrecorded -= count
                self._changed.notify_all()

    async def wait_recorded(self) -> None:
        """Until every delivery so far is recorded on disk (a crash would not resend it)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._unrecorded == 0)

    async def wait_empty(self) -> None:
        async with self._changed:
            await self._changed.wait_for(self._empty)

    async def wait_safe(self) -> bool:
        """Until everything is delivered (True), or nothing held is at risk any more because
        no server takes chunks and everything left is on disk (False)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._empty() or self._all_on_disk())
            return self._empty()

    async def close(self) -> int:
        """Stopping: write what is only in memory to disk, so that the next start delivers
        it. Returns how many chunks were written. What doesn't fit keeps its positions
        uncommitted, so the next start reads it from the engine again."""
        if self.store is None:
            return 0
        if self._writer is not None:
            self._writer.cancel()
        if self._step is not None:
            # An append under way finishes (its chunks queued, their positions committed).
            await asyncio.gather(self._step, return_exceptions=True)
            self._step = None
        if self._recorder is not None:
            self._recorder.cancel()  # the store's close writes what is left
        spill = [c for c in [*self._memory, *(c for c, _ in self._pending)] if not c.stored]
        self._memory.clear()
        written = 0
        if spill and await self._try_append(spill):
            written = len(spill)
            if self.on_durable is not None:
                for chunk in spill:
                    self.on_durable(chunk)
        elif spill:
            log.warning(
                "disk buffer full: %d chunks not written at shutdown; their lines will be "
                "read from the engine again",
                len(spill),
            )
        await asyncio.to_thread(self.store.close)
        return written


def open_store(state_dir: Path, max_bytes: int) -> SegmentStore:
    # Segments small enough that deleting delivered ones frees room well before the cap.
    segment_bytes = max(
        tuning.SEGMENT_MIN_BYTES,
        min(tuning.SEGMENT_MAX_BYTES, max_bytes // tuning.SEGMENTS_PER_BUFFER),
    )
    return SegmentStore(state_dir / "buffer", max_bytes=max_bytes, segment_bytes=segment_bytes)
