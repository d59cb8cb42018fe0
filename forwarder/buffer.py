"""A bounded queue of sealed chunks between the chunker and the output.

Chunks count against ``limit`` bytes from ``put`` until ``done``: a chunk being sent or
awaiting its ack still holds its place. While the buffer is full ``put`` waits, which pauses
the followers; the engine's own log files hold the data meanwhile. Nothing is dropped here.
"""

from __future__ import annotations

import asyncio
from collections import deque

from forwarder.forward.protocol import Chunk


class ChunkBuffer:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._queue: deque[Chunk] = deque()
        self._bytes = 0
        self._changed = asyncio.Condition()
        self.waiting_puts = 0

    def __repr__(self) -> str:
        return f"<ChunkBuffer queued={len(self._queue)} bytes={self._bytes}/{self.limit_bytes}>"

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def queued(self) -> int:
        return len(self._queue)

    def full_for(self, size: int) -> bool:
        # An oversized chunk may enter an empty buffer, or it could never enter at all.
        return self._bytes > 0 and self._bytes + size > self.limit_bytes

    async def put(self, chunk: Chunk) -> None:
        async with self._changed:
            if self.full_for(chunk.size):
                self.waiting_puts += 1
                try:
                    await self._changed.wait_for(lambda: not self.full_for(chunk.size))
                finally:
                    self.waiting_puts -= 1
            self._queue.append(chunk)
            self._bytes += chunk.size
            self._changed.notify_all()

    async def get(self) -> Chunk:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._queue))
            return self._queue.popleft()

    def get_nowait(self) -> Chunk | None:
        return self._queue.popleft() if self._queue else None

    async def requeue(self, chunk: Chunk) -> None:
        """Give back a chunk that could not be delivered; it goes first in line again."""
        async with self._changed:
            self._queue.appendleft(chunk)
            self._changed.notify_all()

    async def done(self, chunk: Chunk) -> None:
        """The chunk is delivered: release its bytes."""
        async with self._changed:
            self._bytes -= chunk.size
            self._changed.notify_all()

    async def wait_empty(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._bytes == 0)
