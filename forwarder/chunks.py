"""Chunks: sealed groups of encoded entries, one tag each, with the positions they carry.

The chunk assembler (:class:`Chunker`) groups entries by tag and seals a chunk by size or
age; a sealed chunk's id and bytes never change, so a resend is identical. Its payload is
a PackedForward message (:func:`forwarder.forward.protocol.encode_message`); everything
else here is the pipeline's: the order chunks were sealed in (``seq``), the positions
they move once delivered, whether the disk buffer holds them.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field, replace
from typing import NewType

from forwarder.forward.protocol import decode_entries, encode_message
from forwarder.records import ContainerId, Position, RecordKind

ChunkId = NewType("ChunkId", str)


def new_chunk_id() -> ChunkId:
    """A unique chunk id: 16 random bytes in base64, as Fluentd's out_forward makes them."""
    return ChunkId(base64.b64encode(os.urandom(16)).decode("ascii"))


@dataclass(slots=True)
class Chunk:
    """A sealed chunk of one tag and one kind of record: its id and payload never change,
    so a resend is identical.

    The payload may be on disk only (``loaded_payload is None``): the disk buffer keeps what
    memory can't hold and reads it back when the chunk is due, so the output sees loaded
    chunks only. ``size`` is the payload's length either way.

    ``seq`` is the chunk's place in this run's sealing order, which is the order its
    positions commit in. A chunk recovered from the disk buffer of an earlier run has none
    (``seq is None``): that run committed its positions when the chunk became durable, so
    delivering it now commits nothing. Nor does it know its ``kind``, which the disk buffer
    does not keep (:func:`kind_of_payload` tells it).
    """

    chunk_id: ChunkId
    tag: str
    count: int
    size: int
    positions: dict[ContainerId, Position] = field(default_factory=dict)
    seq: int | None = None
    kind: RecordKind | None = None
    stored: bool = False  # written to the disk buffer: durable, and released when delivered
    loaded_payload: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        chunk_id: ChunkId,
        tag: str,
        payload: bytes,
        count: int,
        positions: dict[ContainerId, Position] | None = None,
        *,
        seq: int | None = None,
        kind: RecordKind | None = None,
        stored: bool = False,
    ) -> Chunk:
        """A chunk with its payload loaded."""
        return cls(chunk_id, tag, count, len(payload), positions or {}, seq, kind, stored, payload)

    @property
    def payload(self) -> bytes:
        """The chunk's bytes, a PackedForward message; only for a loaded chunk."""
        if self.loaded_payload is None:
            raise RuntimeError(f"chunk {self.chunk_id}: its payload is on disk, not loaded")
        return self.loaded_payload

    @property
    def is_loaded(self) -> bool:
        return self.loaded_payload is not None

    def with_payload(self, payload: bytes) -> Chunk:
        """This chunk with its payload loaded (read back from disk)."""
        return replace(self, loaded_payload=payload)

    def without_payload(self) -> Chunk:
        """This chunk with its payload left on disk only."""
        return replace(self, loaded_payload=None)


class Chunker:
    """Groups entries by tag and kind into chunks, sealed by size or age. (Two kinds can
    share a tag when the tag templates say so; a chunk still holds one kind, so it can be
    counted by kind.) Sans-I/O: the caller passes
    the clock reading (``now``, seconds, monotonic) and decides when to ask for due chunks."""

    def __init__(
        self,
        *,
        chunk_limit: int,
        flush_interval_s: float,
        require_ack: bool,
        compress: bool,
    ) -> None:
        if chunk_limit <= 0:
            raise ValueError("chunk_limit must be positive")
        self._limit = chunk_limit
        self._interval = flush_interval_s
        self._require_ack = require_ack
        self._compress = compress
        self._open: dict[tuple[str, RecordKind], _OpenChunk] = {}
        self._seq = 0

    def add(
        self,
        tag: str,
        entries: bytes,
        count: int,
        now: float,
        position: tuple[ContainerId, Position] | None = None,
        kind: RecordKind = "log",
    ) -> list[Chunk]:
        """Add encoded entries; returns the chunks this sealed (when the limit was reached)."""
        sealed: list[Chunk] = []
        key = (tag, kind)
        current = self._open.get(key)
        if current is not None and current.size + len(entries) > self._limit:
            sealed.append(self._seal(key))
            current = None
        if current is None:
            current = self._open[key] = _OpenChunk(opened_at=now)
        current.parts.append(entries)
        current.size += len(entries)
        current.count += count
        if position is not None:
            current.positions[position[0]] = position[1]
        if current.size >= self._limit:
            sealed.append(self._seal(key))
        return sealed

    def due(self, now: float) -> list[Chunk]:
        """Chunks whose oldest entry has waited ``flush_interval``."""
        keys = [k for k, c in self._open.items() if now - c.opened_at >= self._interval]
        return [self._seal(key) for key in keys]

    def flush_all(self) -> list[Chunk]:
        return [self._seal(key) for key in list(self._open)]

    def next_deadline(self) -> float | None:
        if not self._open:
            return None
        return min(c.opened_at for c in self._open.values()) + self._interval

    @property
    def pending_bytes(self) -> int:
        return sum(c.size for c in self._open.values())

    def _seal(self, key: tuple[str, RecordKind]) -> Chunk:
        tag, kind = key
        current = self._open.pop(key)
        self._seq += 1
        chunk_id = new_chunk_id()
        payload = encode_message(
            tag,
            b"".join(current.parts),
            current.count,
            chunk_id=chunk_id if self._require_ack else None,
            compress=self._compress,
        )
        return Chunk.of(
            chunk_id, tag, payload, current.count, current.positions, seq=self._seq, kind=kind
        )


@dataclass(slots=True)
class _OpenChunk:
    opened_at: float
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    count: int = 0
    positions: dict[ContainerId, Position] = field(default_factory=dict)


def kind_of_payload(payload: bytes) -> RecordKind:
    """The kind of a chunk read back from the disk buffer, which keeps no kind: told by its
    first record's keys (the Chunker never mixes kinds in one chunk)."""
    import msgpack

    _tag, entries, options = msgpack.unpackb(payload, raw=False)
    if options.get("compressed") == "gzip":
        import gzip

        entries = gzip.decompress(entries)
    for _time, record in decode_entries(entries):
        if "log" in record:
            return "log"
        return "lifecycle" if "action" in record else "stats"
    return "log"
