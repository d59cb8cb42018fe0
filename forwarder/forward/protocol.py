"""The Forward protocol, sans-I/O: records in, bytes out; bytes in, events out.

Wire shapes (Forward protocol v1, msgpack):

    EventTime               ext type 0, 8 bytes: big-endian u32 seconds, u32 nanoseconds
    Entry                   [time, record]
    PackedForward           [tag, bin(entry entry ...), {"size": n, "chunk": id}]
    CompressedPackedForward [tag, bin(gzip(entry entry ...)), {"size": n, "chunk": id,
                                                                "compressed": "gzip"}]
    Ack (server -> client)  {"ack": id}

``chunk`` is sent only when an ack is wanted. Nothing here touches a socket: the asyncio
client in :mod:`forwarder.forward.client` moves the bytes.
"""

from __future__ import annotations

import base64
import enum
import gzip
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NewType

import msgpack

from forwarder.docker.frames import LogLine
from forwarder.events import ContainerId, EventTime, Position

ChunkId = NewType("ChunkId", str)

RecordKind = Literal["log", "stats", "lifecycle"]
"""What a chunk's records are: the Chunker never mixes kinds in one chunk."""

EVENT_TIME_EXT = 0
_EVENT_TIME = struct.Struct(">II")
ExtType = msgpack.ExtType

# A reply bigger than this is not an ack or a handshake message: the peer is confused.
MAX_REPLY_BYTES = 1 << 20


class ProtocolError(Exception):
    """Base of Forward protocol errors."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The server sent something we can't accept; drop the connection and retry."""


class HandshakeRequiredError(RemoteProtocolError):
    """The server sent a HELO on a connection opened without the handshake: it has security
    configured and wants a shared key that our configuration does not give."""


def event_time(ts_ns: int) -> msgpack.ExtType:
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    return ExtType(EVENT_TIME_EXT, _EVENT_TIME.pack(seconds, ns))


def decode_event_time(ext: msgpack.ExtType) -> EventTime:
    if ext.code != EVENT_TIME_EXT or len(ext.data) != 8:
        raise ValueError(f"not an EventTime: ext type {ext.code}, {len(ext.data)} bytes")
    return EventTime(*_EVENT_TIME.unpack(ext.data))


def new_chunk_id() -> ChunkId:
    """A unique chunk id: 16 random bytes in base64, as Fluentd's out_forward makes them."""
    return ChunkId(base64.b64encode(os.urandom(16)).decode("ascii"))


def _strip_array_header(packed: bytes, count: int) -> bytes:
    # msgpack array headers: fixarray (1 byte) below 16, array16 (3) below 2**16, else array32.
    if count < 16:
        return packed[1:]
    if count < 0x10000:
        return packed[3:]
    return packed[5:]


_PACKER = msgpack.Packer(use_bin_type=True, autoreset=True)


def encode_entries(entries: Sequence[tuple[int, dict[str, Any]]]) -> bytes:
    """Concatenated ``[time, record]`` entries for ``(ts_ns, record)`` pairs."""
    packed = _PACKER.pack([[event_time(ts), record] for ts, record in entries])
    return _strip_array_header(packed, len(entries))


_ENTRY_HEAD = b"\x92\xd7\x00"  # [time, record]: a 2-array, then fixext 8 of type 0 (EventTime)


def encode_log_entries(container_id: str, container_name: str, lines: Sequence[LogLine]) -> bytes:
    """Concatenated log entries with exactly the keys Docker's fluentd driver sends, in
    :class:`~forwarder.events.LogEvent`'s order.

    Everything but the time, the source and the text is the same for every line of a batch,
    so it is packed once; per line there is one ``struct`` call and one msgpack call (both
    in C), and the parts are joined once.
    """
    pack = _PACKER.pack
    head = (
        b"\x84"
        + pack("container_id")
        + pack(container_id)
        + pack("container_name")
        + pack(container_name)
        + pack("source")
    )
    source_and_key = {
        "stdout": pack("stdout") + pack("log"),
        "stderr": pack("stderr") + pack("log"),
    }
    pack_time = _EVENT_TIME.pack
    billion = 1_000_000_000
    parts: list[bytes] = []
    extend = parts.extend
    for line in lines:
        extend(
            (
                _ENTRY_HEAD,
                pack_time(*divmod(line.ts_ns, billion)),
                head,
                source_and_key[line.source],
                pack(line.text),
            )
        )
    return b"".join(parts)


def encode_message(
    tag: str,
    entries: bytes,
    count: int,
    *,
    chunk_id: ChunkId | None,
    compress: bool = False,
) -> bytes:
    """A PackedForward (or CompressedPackedForward) message."""
    options: dict[str, Any] = {"size": count}
    if compress:
        entries = gzip.compress(entries, compresslevel=6, mtime=0)
        options["compressed"] = "gzip"
    if chunk_id is not None:
        options["chunk"] = chunk_id
    packed: bytes = _PACKER.pack([tag, entries, options])
    return packed


@dataclass(slots=True)
class Chunk:
    """A sealed chunk: its id and bytes never change, so a resend is identical."""

    seq: int
    chunk_id: ChunkId
    tag: str
    payload: bytes
    count: int
    positions: dict[ContainerId, Position] = field(default_factory=dict)
    stored: bool = False  # written to the disk buffer: durable, and released when delivered
    kind: RecordKind | None = None  # None: read back from the disk buffer, which keeps no kind

    @property
    def size(self) -> int:
        return len(self.payload)


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
            raise LocalProtocolError("chunk_limit must be positive")
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
        return Chunk(self._seq, chunk_id, tag, payload, current.count, current.positions, kind=kind)


@dataclass(slots=True)
class _OpenChunk:
    opened_at: float
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    count: int = 0
    positions: dict[ContainerId, Position] = field(default_factory=dict)


# --- the client side of a connection ------------------------------------------------------


class ConnState(enum.Enum):
    AWAITING_HELO = "AWAITING_HELO"
    AWAITING_PONG = "AWAITING_PONG"
    READY = "READY"
    AWAITING_ACK = "AWAITING_ACK"
    CLOSED = "CLOSED"


@dataclass(frozen=True, slots=True)
class Helo:
    message: list[Any]


@dataclass(frozen=True, slots=True)
class Pong:
    message: list[Any]


@dataclass(frozen=True, slots=True)
class Acked:
    chunk_id: ChunkId


ServerEvent = Helo | Pong | Acked


class ClientConnection:
    """The client's view of one Forward connection, as a state machine.

    ``receive_data`` buffers the server's bytes and ``next_event`` parses them. Allowed
    transitions (anything else raises):

        AWAITING_HELO --Helo--> AWAITING_PONG --Pong--> READY     (with a handshake)
        READY --send_chunk(ack)--> AWAITING_ACK --Acked (the last one awaited)--> READY
        AWAITING_ACK --send_chunk(ack)--> AWAITING_ACK           (pipelined chunks)
        any --close--> CLOSED

    Several chunks may await their acks at once; an ack for a chunk not awaited is the
    server's fault. A HELO on a connection made without the handshake raises
    HandshakeRequiredError.
    """

    def __init__(self, *, handshake: bool) -> None:
        self.state = ConnState.AWAITING_HELO if handshake else ConnState.READY
        # surrogateescape: Fluent Bit packs its random HELO nonce as a str that is not UTF-8;
        # the handshake recovers the exact bytes from it.
        self._unpacker = msgpack.Unpacker(
            raw=False, unicode_errors="surrogateescape", max_buffer_size=MAX_REPLY_BYTES
        )
        self._awaiting: dict[ChunkId, None] = {}  # insertion-ordered: oldest first

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state.value}>"

    def receive_data(self, data: bytes) -> None:
        if self.state is ConnState.CLOSED:
            raise LocalProtocolError("receive_data on a closed connection")
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise RemoteProtocolError(
                f"the server sent over {MAX_REPLY_BYTES} bytes without a complete message"
            ) from exc

    def next_event(self) -> ServerEvent | None:
        """The next complete event, or ``None`` when more bytes are needed."""
        try:
            obj = next(self._unpacker)
        except StopIteration:
            return None
        except (ValueError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"undecodable bytes from the server: {exc}") from exc
        return self._classify(obj)

    def _classify(self, obj: object) -> ServerEvent:
        state = self.state
        if state is ConnState.AWAITING_HELO:
            if isinstance(obj, list) and obj and obj[0] == "HELO":
                self.state = ConnState.AWAITING_PONG
                return Helo(obj)
            raise RemoteProtocolError(f"expected HELO, got {_shorten(obj)}")
        if state is ConnState.AWAITING_PONG:
            if isinstance(obj, list) and obj and obj[0] == "PONG":
                return Pong(obj)
            raise RemoteProtocolError(f"expected PONG, got {_shorten(obj)}")
        if state in (ConnState.READY, ConnState.AWAITING_ACK) and _is_helo(obj):
            raise HandshakeRequiredError(
                "the server asks for the handshake (HELO), but [output] shared_key is not set"
            )
        if state is ConnState.AWAITING_ACK:
            if isinstance(obj, dict) and "ack" in obj:
                ack = obj["ack"]
                if isinstance(ack, bytes):
                    ack = ack.decode("ascii", "replace")
                if ack not in self._awaiting:
                    raise RemoteProtocolError(f"ack for an unknown chunk {_shorten(ack)}")
                del self._awaiting[ack]
                if not self._awaiting:
                    self.state = ConnState.READY
                return Acked(ChunkId(ack))
            raise RemoteProtocolError(f"expected an ack, got {_shorten(obj)}")
        raise RemoteProtocolError(f"unexpected message from the server: {_shorten(obj)}")

    def handshake_done(self) -> None:
        """The PONG checked out (see :mod:`forwarder.forward.handshake`)."""
        if self.state is not ConnState.AWAITING_PONG:
            raise LocalProtocolError(f"handshake_done in state {self.state.value}")
        self.state = ConnState.READY

    @property
    def awaiting_acks(self) -> int:
        """Chunks sent whose ack has not come yet."""
        return len(self._awaiting)

    def send_chunk(self, chunk: Chunk, *, expect_ack: bool) -> bytes:
        if self.state not in (ConnState.READY, ConnState.AWAITING_ACK):
            raise LocalProtocolError(f"send_chunk in state {self.state.value}")
        if expect_ack:
            if chunk.chunk_id in self._awaiting:
                raise LocalProtocolError(f"chunk {chunk.chunk_id} is already awaiting its ack")
            self._awaiting[chunk.chunk_id] = None
            self.state = ConnState.AWAITING_ACK
        return chunk.payload

    def close(self) -> None:
        self.state = ConnState.CLOSED


def _is_helo(obj: object) -> bool:
    return isinstance(obj, list) and len(obj) == 2 and obj[0] == "HELO"


def _shorten(obj: object, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_entries(entries: bytes) -> Iterable[tuple[EventTime, dict[str, Any]]]:
    """Decode concatenated entries (for tests, tools and the stdout output)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(entries)
    for time, record in unpacker:
        yield (decode_event_time(time) if isinstance(time, ExtType) else EventTime(time, 0)), record
