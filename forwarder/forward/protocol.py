"""The Forward protocol, sans-I/O: records in, bytes out; bytes in, events out.

Wire shapes (Forward protocol v1, msgpack):

    EventTime               ext type 0, 8 bytes: big-endian u32 seconds, u32 nanoseconds
    Entry                   [time, record]
    PackedForward           [tag, bin(entry entry ...), {"size": n, "chunk": id}]
    CompressedPackedForward [tag, bin(gzip(entry entry ...)), {"size": n, "chunk": id,
                                                                "compressed": "gzip"}]
    Ack (server -> client)  {"ack": id}

``chunk`` is sent only when an ack is wanted. Nothing here touches a socket: the asyncio
connection in :mod:`forwarder.forward.connection` moves the bytes.
"""

from __future__ import annotations

import enum
import gzip
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import msgpack

from forwarder.forward.handshake import ClientHandshake
from forwarder.records import EventTime

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


class LogLineLike(Protocol):
    """What :func:`encode_log_entries` reads of a line (a source's ``LogLine`` has it)."""

    @property
    def source(self) -> str: ...
    @property
    def ts_ns(self) -> int: ...
    @property
    def text(self) -> str: ...


class SendableChunk(Protocol):
    """What :meth:`ClientConnection.send_chunk` reads of a chunk."""

    @property
    def chunk_id(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


_ENTRY_HEAD = b"\x92\xd7\x00"  # [time, record]: a 2-array, then fixext 8 of type 0 (EventTime)


class LogHead(NamedTuple):
    """What is the same in every log entry of one container, packed once
    (:func:`log_head`)."""

    head: bytes
    """The map header, container_id and container_name with their values, the key "source"."""
    source_and_key: dict[str, bytes]
    """Per stream: the source value and the key "log"."""
    log: bytes | None
    """The packed ``log`` value when an extra key replaces it (a label named "log"), else
    None: each line's text."""
    tail: bytes
    """The extra keys other than the four, with their values."""


_BASE_KEYS = ("container_id", "container_name", "source", "log")


def log_head(
    container_id: str, container_name: str, extra: Mapping[str, Any] | None = None
) -> LogHead:
    """Pack the constant part of a container's log entries: the driver's four keys, then
    ``extra`` keys as Docker's fluentd driver adds them: after the four, and replacing the
    value of one of the four of the same name (the driver sets them last)."""
    pack = _PACKER.pack
    extra = extra or {}
    added = {k: v for k, v in extra.items() if k not in _BASE_KEYS}
    count = 4 + len(added)
    if count < 16:
        header = bytes([0x80 | count])
    elif count < 0x10000:
        header = b"\xde" + count.to_bytes(2, "big")
    else:
        header = b"\xdf" + count.to_bytes(4, "big")
    head = (
        header
        + pack("container_id")
        + pack(extra.get("container_id", container_id))
        + pack("container_name")
        + pack(extra.get("container_name", container_name))
        + pack("source")
    )
    source_and_key = {
        name: pack(extra.get("source", name)) + pack("log") for name in ("stdout", "stderr")
    }
    log = pack(extra["log"]) if "log" in extra else None
    tail = b"".join(pack(k) + pack(v) for k, v in added.items())
    return LogHead(head, source_and_key, log, tail)


def encode_log_entries(
    container_id: str,
    container_name: str,
    lines: Sequence[LogLineLike],
    extra: Mapping[str, Any] | None = None,
    *,
    head: LogHead | None = None,
) -> bytes:
    """Concatenated log entries with exactly the keys Docker's fluentd driver sends, in
    :class:`~forwarder.records.LogEvent`'s order, then the ``extra`` keys (see
    :func:`log_head`; a caller that sends many batches passes the ``head`` it packed once).

    Everything but the time, the source and the text is the same for every line of a batch,
    so it is packed once; per line there is one ``struct`` call and one msgpack call (both
    in C), and the parts are joined once.
    """
    if head is None:
        head = log_head(container_id, container_name, extra)
    pack = _PACKER.pack
    prefix = head.head
    source_and_key = head.source_and_key
    pack_time = _EVENT_TIME.pack
    billion = 1_000_000_000
    parts: list[bytes] = []
    extend = parts.extend
    if head.log is None and not head.tail:
        for line in lines:
            extend(
                (
                    _ENTRY_HEAD,
                    pack_time(*divmod(line.ts_ns, billion)),
                    prefix,
                    source_and_key[line.source],
                    pack(line.text),
                )
            )
    else:
        log, tail = head.log, head.tail
        for line in lines:
            extend(
                (
                    _ENTRY_HEAD,
                    pack_time(*divmod(line.ts_ns, billion)),
                    prefix,
                    source_and_key[line.source],
                    pack(line.text) if log is None else log,
                    tail,
                )
            )
    return b"".join(parts)


def encode_message(
    tag: str,
    entries: bytes,
    count: int,
    *,
    chunk_id: str | None,
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
    chunk_id: str
    waiter: object = field(default=None, compare=False, repr=False)
    """What the caller gave ``send_chunk`` with the chunk (the I/O layer's future)."""


ServerEvent = Helo | Pong | Acked

W = TypeVar("W")


class ClientConnection(Generic[W]):
    """The client's side of one Forward connection, as one state machine, h11-style.

    ``receive_data`` buffers the server's bytes, ``next_event`` parses them and makes every
    transition, ``data_to_send`` returns what the protocol wants written (the PING), and
    ``send_chunk`` returns a chunk's bytes. Allowed transitions (anything else raises)::

        AWAITING_HELO --Helo (PING queued)--> AWAITING_PONG --Pong (checked)--> READY
        READY --send_chunk(ack)--> AWAITING_ACK --Acked (the last one awaited)--> READY
        AWAITING_ACK --send_chunk(ack)--> AWAITING_ACK           (pipelined chunks)
        any --close, or a handshake that fails--> CLOSED

    With a :class:`~forwarder.forward.handshake.ClientHandshake` the connection starts in
    AWAITING_HELO and hands it the HELO and the PONG: the handshake checks them and makes
    the PING, the connection alone holds the state. Its errors
    (:class:`~forwarder.forward.handshake.HandshakeError`) come out of ``next_event``.

    This is the one record of the chunks awaiting their acks on the connection, oldest
    first, each with the caller's ``waiter`` (the I/O layer's future). An ack for a chunk
    not awaited is the server's fault. A HELO on a connection made without the handshake
    raises HandshakeRequiredError.
    """

    def __init__(self, handshake: ClientHandshake | None = None) -> None:
        self.state = ConnState.AWAITING_HELO if handshake is not None else ConnState.READY
        self._handshake = handshake
        # surrogateescape: Fluent Bit packs its random HELO nonce as a str that is not UTF-8;
        # the handshake recovers the exact bytes from it.
        self._unpacker = msgpack.Unpacker(
            raw=False, unicode_errors="surrogateescape", max_buffer_size=MAX_REPLY_BYTES
        )
        self._awaiting: dict[str, W | None] = {}  # insertion-ordered: oldest first
        self._outgoing = bytearray()
        self.acks = 0
        """Acks received on this connection."""

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state.value} awaiting={len(self._awaiting)}>"

    @property
    def keepalive(self) -> bool:
        """False when the server's HELO said so: it closes after each chunk."""
        return self._handshake is None or self._handshake.keepalive is not False

    @property
    def is_ready(self) -> bool:
        """Past the handshake and not closed: chunks may be sent."""
        return self.state in (ConnState.READY, ConnState.AWAITING_ACK)

    def receive_data(self, data: bytes) -> None:
        if self.state is ConnState.CLOSED:
            raise LocalProtocolError("receive_data on a closed connection")
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise RemoteProtocolError(
                f"the server sent over {MAX_REPLY_BYTES} bytes without a complete message"
            ) from exc

    def data_to_send(self) -> bytes:
        """The bytes the protocol wants written now (the PING after a HELO), once."""
        data, self._outgoing = bytes(self._outgoing), bytearray()
        return data

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
                self._outgoing += self._handshaking(obj, helo=True)
                self.state = ConnState.AWAITING_PONG
                return Helo(obj)
            raise RemoteProtocolError(f"expected HELO, got {_shorten(obj)}")
        if state is ConnState.AWAITING_PONG:
            if isinstance(obj, list) and obj and obj[0] == "PONG":
                self._handshaking(obj, helo=False)
                self.state = ConnState.READY
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
                waiter = self._awaiting.pop(ack)
                self.acks += 1
                if not self._awaiting:
                    self.state = ConnState.READY
                return Acked(ack, waiter)
            raise RemoteProtocolError(f"expected an ack, got {_shorten(obj)}")
        raise RemoteProtocolError(f"unexpected message from the server: {_shorten(obj)}")

    def _handshaking(self, message: list[Any], *, helo: bool) -> bytes:
        """Hand the HELO or the PONG to the handshake; a failure closes the connection."""
        handshake = self._handshake
        assert handshake is not None  # only a connection made with one awaits HELO/PONG
        try:
            if helo:
                return handshake.receive_helo(message)
            handshake.receive_pong(message)
        except BaseException:
            self.state = ConnState.CLOSED
            raise
        return b""

    @property
    def awaiting_acks(self) -> int:
        """Chunks sent whose ack has not come yet."""
        return len(self._awaiting)

    def send_chunk(
        self, chunk: SendableChunk, *, expect_ack: bool, waiter: W | None = None
    ) -> bytes:
        if self.state not in (ConnState.READY, ConnState.AWAITING_ACK):
            raise LocalProtocolError(f"send_chunk in state {self.state.value}")
        if expect_ack:
            if chunk.chunk_id in self._awaiting:
                raise LocalProtocolError(f"chunk {chunk.chunk_id} is already awaiting its ack")
            self._awaiting[chunk.chunk_id] = waiter
            self.state = ConnState.AWAITING_ACK
        return chunk.payload

    def connection_lost(self) -> list[W | None]:
        """The connection is gone: returns the waiters of the chunks that were awaiting
        their acks, oldest first (none will come). During the handshake what was received
        before the loss can still be read (a PONG with the server's reason, then a close)."""
        if self.state in (ConnState.READY, ConnState.AWAITING_ACK):
            self.state = ConnState.CLOSED
        waiters = list(self._awaiting.values())
        self._awaiting.clear()
        return waiters

    def close(self) -> None:
        """Closed by us; the chunks awaiting their acks are taken by ``connection_lost``."""
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
