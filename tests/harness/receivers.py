"""Forward protocol receivers for tests and benchmarks (real sockets, never mocks).

- :class:`ForwardReceiver`: our own Python Forward server (threads and sockets). It decodes
  every mode (Message, Forward, PackedForward, CompressedPackedForward), keeps the records,
  answers acks, can do the v1 handshake, and has knobs for fault tests.
- :class:`CountingReceiver`: counts entries and acks, with minimal per-entry work (benchmarks).
  Also runnable as a process: ``python -m tests.harness.receivers --port 0``.
- :class:`NodeReceiver`: a real third-party receiver, ``FluentServer`` from the Fluent project's
  ``@fluent-org/logger``, run by ``tests/peers/fluent_server.js`` in a Node process.

Wire shapes (Fluentd Forward Protocol Specification v1)::

    Message                  [tag, time, record, option?]
    Forward                  [tag, [[time, record], ...], option?]
    PackedForward            [tag, bin|str (concatenated msgpack [time, record]), option?]
    CompressedPackedForward  as PackedForward, option {"compressed": "gzip"}; the payload may be
                             several gzip members one after another
    EventTime                ext type 0, 8 bytes: big-endian u32 seconds, u32 nanoseconds
    ack                      {"ack": <option.chunk>}
    HELO                     ["HELO", {"nonce": bin, "auth": salt|"", "keepalive": bool}]
    PING                     ["PING", client_hostname, shared_key_salt,
                              sha512_hex(shared_key_salt + client_hostname + nonce + shared_key),
                              username, sha512_hex(auth_salt + username + password)]
    PONG                     ["PONG", ok, reason, server_hostname,
                              sha512_hex(shared_key_salt + server_hostname + nonce + shared_key)]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, TypeVar

import msgpack

from forwarder.forward import handshake

EVENT_TIME_EXT_CODE = 0
PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
NODE_SCRIPT = PEERS_DIR / "fluent_server.js"
# Sent instead of an ack by ForwardReceiver(garbage=True): 0xc1 is never valid msgpack.
GARBAGE = b"\xc1\xc1garbage\xff\x00"
RECV_BYTES = 256 * 1024
# Far above any chunk the forwarder should send; an Unpacker refuses more than this at once.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class SenderProtocolError(Exception):
    """The sender (the forwarder under test) broke the Forward protocol."""


class EventTime(NamedTuple):
    """A decoded Forward EventTime."""

    seconds: int
    nanoseconds: int

    @property
    def ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nanoseconds


Time = EventTime | int | float


class ForwardEntry(NamedTuple):
    """One event of a Forward message, as decoded by :func:`decode_forward_message`."""

    tag: str
    time: Time
    record: dict[str, Any]
    options: dict[str, Any]


class ReceivedRecord(TypedDict):
    """What the receivers keep per event (``conn``: the connection's serial number, from 1)."""

    tag: str
    time_ns: int
    record: dict[str, Any]
    chunk_id: str | None
    conn: int


# ---- sans-I/O decoding --------------------------------------------------------------------


def ext_hook(code: int, data: bytes) -> object:
    """msgpack ext hook: EventTime (code 0) becomes :class:`EventTime`; others stay ExtType."""
    if code == EVENT_TIME_EXT_CODE:
        if len(data) != 8:
            raise SenderProtocolError(f"EventTime ext of {len(data)} bytes, expected 8")
        seconds, nanoseconds = struct.unpack(">II", data)
        return EventTime(seconds, nanoseconds)
    return msgpack.ExtType(code, data)


def new_unpacker(**kwargs: Any) -> msgpack.Unpacker:
    """An Unpacker for Forward traffic.

    Strings decode as UTF-8 with ``surrogateescape``: a PackedForward payload sent as msgpack
    ``str`` (as Fluentd does) can then be turned back into its exact bytes, and a record string
    holding invalid UTF-8 shows up as lone surrogates instead of killing the connection.
    """
    return msgpack.Unpacker(
        raw=False,
        unicode_errors="surrogateescape",
        ext_hook=ext_hook,
        max_buffer_size=MAX_MESSAGE_BYTES,
        **kwargs,
    )


def time_to_ns(value: object) -> int:
    """Nanoseconds since the epoch of a Forward time (EventTime, integer or float seconds)."""
    if isinstance(value, EventTime):
        return value.ns
    if isinstance(value, msgpack.ExtType) and value.code == EVENT_TIME_EXT_CODE:
        decoded = ext_hook(value.code, value.data)
        assert isinstance(decoded, EventTime)
        return decoded.ns
    if isinstance(value, bool):
        raise SenderProtocolError(f"time is a boolean: {value!r}")
    if isinstance(value, int):
        return value * 1_000_000_000
    if isinstance(value, float):
        return round(value * 1_000_000_000)
    raise SenderProtocolError(f"time is neither EventTime nor a number: {value!r}")


def _time(value: object) -> Time:
    if isinstance(value, msgpack.ExtType) and value.code == EVENT_TIME_EXT_CODE:
        decoded = ext_hook(value.code, value.data)
        assert isinstance(decoded, EventTime)
        return decoded
    if isinstance(value, EventTime | int | float) and not isinstance(value, bool):
        return value
    raise SenderProtocolError(f"time is neither EventTime nor a number: {value!r}")


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise SenderProtocolError(f"{what} is {type(value).__name__}, expected bytes or str")


def _as_str(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    raise SenderProtocolError(f"{what} is {type(value).__name__}, expected str")


def _options(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SenderProtocolError(f"option is {type(value).__name__}, expected a map")
    return {_as_str(k, "option key"): v for k, v in value.items()}


def _record(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SenderProtocolError(f"record is {type(value).__name__}, expected a map")
    return value


def decode_packed_entries(payload: bytes) -> list[tuple[Time, dict[str, Any]]]:
    """The ``[time, record]`` entries of a PackedForward payload (already decompressed)."""
    unpacker = new_unpacker()
    unpacker.feed(payload)
    entries: list[tuple[Time, dict[str, Any]]] = []
    complete = 0  # bytes up to the end of the last whole entry
    try:
        for entry in unpacker:
            if not isinstance(entry, list) or len(entry) != 2:
                raise SenderProtocolError(f"packed entry is not [time, record]: {entry!r:.200}")
            entries.append((_time(entry[0]), _record(entry[1])))
            complete = unpacker.tell()
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise SenderProtocolError(f"undecodable packed entries: {exc}") from exc
    if complete != len(payload):
        raise SenderProtocolError(
            f"packed entries end with {len(payload) - complete} bytes of an incomplete entry"
        )
    return entries


def gunzip_members(payload: bytes) -> bytes:
    """Decompress a gzip payload that may be several members back to back."""
    try:
        return gzip.decompress(payload)
    except (OSError, EOFError, ValueError) as exc:
        raise SenderProtocolError(f"bad gzip payload: {exc}") from exc


def decode_forward_message(obj: object) -> list[ForwardEntry]:
    """Decode one unpacked Forward message of any mode into its entries.

    ``obj`` is what an Unpacker made with :func:`new_unpacker` yields (EventTime decoded, or
    a raw ``msgpack.ExtType`` of code 0, both are accepted). Raises :class:`SenderProtocolError`
    on anything the spec doesn't allow.
    """
    if not isinstance(obj, list | tuple) or not 2 <= len(obj) <= 4:
        raise SenderProtocolError(f"not a Forward message: {obj!r:.200}")
    tag = _as_str(obj[0], "tag")
    second = obj[1]
    if isinstance(second, list):  # Forward
        if len(obj) > 3:
            raise SenderProtocolError(f"Forward message of {len(obj)} elements")
        options = _options(obj[2] if len(obj) == 3 else None)
        entries: list[tuple[Time, dict[str, Any]]] = []
        for entry in second:
            if not isinstance(entry, list | tuple) or len(entry) != 2:
                raise SenderProtocolError(f"Forward entry is not [time, record]: {entry!r:.200}")
            entries.append((_time(entry[0]), _record(entry[1])))
    elif isinstance(second, bytes | str):  # PackedForward, CompressedPackedForward
        if len(obj) > 3:
            raise SenderProtocolError(f"PackedForward message of {len(obj)} elements")
        options = _options(obj[2] if len(obj) == 3 else None)
        payload = _as_bytes(second, "PackedForward entries")
        compressed = options.get("compressed")
        if compressed == "gzip":
            payload = gunzip_members(payload)
        elif compressed not in (None, "text"):
            raise SenderProtocolError(f"unknown compression {compressed!r}")
        entries = decode_packed_entries(payload)
    else:  # Message
        if len(obj) < 3:
            raise SenderProtocolError(f"Message of {len(obj)} elements")
        options = _options(obj[3] if len(obj) == 4 else None)
        entries = [(_time(second), _record(obj[2]))]
    return [ForwardEntry(tag, t, record, options) for t, record in entries]


def sha512_hex(*parts: bytes | str) -> str:
    """``sha512_hex(a + b + ...)`` of the spec; str parts are UTF-8."""
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


# ---- the socket server ------------------------------------------------------------------


class _ConnectionClosed(Exception):
    """The peer closed the connection (raised while reading)."""


class _Close(Exception):
    """Raised by a message handler to end the connection (``reset``: with an RST)."""

    def __init__(self, reset: bool = False) -> None:
        super().__init__()
        self.reset = reset


class _ForwardServer:
    """Accept loop, one thread per connection, optional TLS and handshake; subclasses
    handle the decoded messages in :meth:`_on_message`."""

    _raw = False

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        shared_key: str | None = None,
        self_hostname: str = "forwarder-test-receiver",
        users: Mapping[str, str] | None = None,
        bad_pong_digest: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.shared_key = shared_key
        self.self_hostname = self_hostname
        self.users = dict(users) if users is not None else None
        self.bad_pong_digest = bad_pong_digest
        self.tls = tls
        self.connections_total = 0
        self.errors: list[str] = []
        self.auth_failures: list[str] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._listener is not None

    def __enter__(self) -> _ForwardServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.address} {state} conns={self.connections_total}>"

    def start(self) -> _ForwardServer:
        """Listen (again) on ``port``; the first start with port 0 picks a free port."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"{self!r} accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and close every connection (an outage); :meth:`start` resumes."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with self._lock:
            self._stopping.set()
            conns = list(self._conns.values())
        _shutdown(listener)
        listener.close()
        for conn in conns:
            _shutdown(conn)
        deadline = time.monotonic() + timeout
        threads = [self._accept_thread, *self._threads] if self._accept_thread else self._threads
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        self._threads = [t for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"threads still running after stop(): {alive}")

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # stop() shut the listener down
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set():  # stop() already took its list of connections
                    conn.close()
                    return
                self.connections_total += 1
                conn_id = self.connections_total
                self._conns[conn_id] = conn
                thread = threading.Thread(
                    target=self._serve, args=(conn, conn_id), name=f"conn {conn_id}", daemon=True
                )
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _record_error(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
            self._cond.notify_all()

    def _serve(self, conn: socket.socket, conn_id: int) -> None:
        sock = conn
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(conn, server_side=True)
                with self._lock:
                    self._conns[conn_id] = sock
            unpacker = self._new_unpacker()
            if self.shared_key is not None and not self._handshake(sock, unpacker):
                return
            for obj in self._messages(sock, unpacker):
                self._on_message(sock, conn_id, obj)
        except _Close as close:
            if close.reset:
                _reset(sock)
        except (_ConnectionClosed, ConnectionResetError, BrokenPipeError):
            pass  # the sender hung up, which it may do at any time
        except SenderProtocolError as exc:
            self._record_error(f"conn {conn_id}: {exc}")
        except (OSError, ValueError) as exc:  # ValueError: msgpack's undecodable input
            if not self._stopping.is_set():
                self._record_error(f"conn {conn_id}: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._conns.pop(conn_id, None)
            sock.close()

    def _new_unpacker(self) -> msgpack.Unpacker:
        if self._raw:
            return msgpack.Unpacker(raw=True, max_buffer_size=MAX_MESSAGE_BYTES)
        return new_unpacker()

    def _messages(self, sock: socket.socket, unpacker: msgpack.Unpacker) -> Iterator[object]:
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise _ConnectionClosed
            self._on_bytes(len(data))
            unpacker.feed(data)
            yield from unpacker

    def _on_bytes(self, n: int) -> None:
        pass

    def _read_one(self, sock: socket.socket, unpacker: msgpack.Unpacker) -> object:
        for obj in self._messages(sock, unpacker):
            return obj
        raise _ConnectionClosed  # pragma: no cover - _messages never ends normally

    def _handshake(self, sock: socket.socket, unpacker: msgpack.Unpacker) -> bool:
        """The server's side of the handshake, made of :mod:`forwarder.forward.handshake`'s
        (the one implementation; the client's side is checked against it and against
        independent peers)."""
        assert self.shared_key is not None
        nonce = secrets.token_bytes(16)
        auth_salt = secrets.token_bytes(16) if self.users is not None else b""
        sock.sendall(handshake.make_helo(nonce, auth_salt))
        ping = self._read_one(sock, unpacker)
        if self._raw and isinstance(ping, list) and ping:
            ping = [_as_str(ping[0], "PING"), *ping[1:]]
        verdict = handshake.check_ping(
            ping,
            nonce,
            auth_salt,
            self.shared_key,
            self.users or {},
            server_hostname=self.self_hostname,
        )
        # bad_pong_digest: a PONG that proves another key than the one the client holds.
        proof_key = self.shared_key + "-wrong" if self.bad_pong_digest else self.shared_key
        if not verdict.ok:  # recorded before the PONG, so a client that sees it can check this
            with self._cond:
                self.auth_failures.append(verdict.reason)
                self._cond.notify_all()
        pong = handshake.make_pong(
            verdict.ok,
            verdict.reason,
            self.self_hostname,
            verdict.shared_key_salt,
            nonce,
            proof_key,
        )
        sock.sendall(pong)
        return verdict.ok

    def _on_message(self, sock: socket.socket, conn_id: int, obj: object) -> None:
        raise NotImplementedError


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _deadline_wait(cond: threading.Condition, ready: Callable[[], bool], timeout: float) -> bool:
    """Wait on ``cond`` (held by the caller) until ``ready()`` or the deadline."""
    deadline = time.monotonic() + timeout
    while not ready():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        cond.wait(remaining)
    return True


RecordsPredicate = Callable[[list[ReceivedRecord]], bool]
R = TypeVar("R")


def _records_predicate(what: int | Callable[[list[R]], bool]) -> Callable[[list[R]], bool]:
    """An int is a minimum record count; a callable is used as it is."""
    if isinstance(what, int):
        count = what
        return lambda records: len(records) >= count
    return what


class ForwardReceiver(_ForwardServer):
    """Our own Forward server. It keeps every event it receives in :attr:`records`.

    Knobs (plain attributes, which a test may also change while it runs):

    - ``ack`` (default True): answer ``{"ack": chunk}`` to a message with a ``chunk`` option;
      False accepts the data and never acks;
    - ``garbage``: answer undecodable bytes instead of the ack;
    - ``ack_delay``: seconds to wait before acking (this connection reads nothing meanwhile);
    - ``close_after_n_chunks``: on each connection, the n-th message is dropped unstored and
      unacked, and the connection is reset (RST), as if the server crashed mid-stream;
    - ``shared_key`` / ``self_hostname`` / ``users``: do the v1 handshake (``users``: user auth);
    - ``bad_pong_digest``: accept the PING but answer a PONG with a wrong digest;
    - ``tls``: an ``ssl.SSLContext`` (server side) wrapping every accepted connection.

    :meth:`stop` and :meth:`start` simulate an outage on the same port.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ack: bool = True,
        garbage: bool = False,
        ack_delay: float = 0.0,
        close_after_n_chunks: int | None = None,
        shared_key: str | None = None,
        self_hostname: str = "forwarder-test-receiver",
        users: Mapping[str, str] | None = None,
        bad_pong_digest: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            host=host,
            port=port,
            shared_key=shared_key,
            self_hostname=self_hostname,
            users=users,
            bad_pong_digest=bad_pong_digest,
            tls=tls,
        )
        if close_after_n_chunks is not None and close_after_n_chunks < 1:
            raise ValueError("close_after_n_chunks must be at least 1")
        self.ack = ack
        self.garbage = garbage
        self.ack_delay = ack_delay
        self.close_after_n_chunks = close_after_n_chunks
        self.records: list[ReceivedRecord] = []
        self.chunk_ids: list[str] = []  # in arrival order, one per stored chunk-carrying message
        self.acks_sent: list[str] = []
        self.messages_received = 0  # stored messages (every mode), chunk option or not
        self.messages_dropped = 0  # dropped by close_after_n_chunks
        self._per_conn: dict[int, int] = {}

    def __enter__(self) -> ForwardReceiver:
        super().__enter__()
        return self

    def start(self) -> ForwardReceiver:
        super().start()
        return self

    @property
    def chunks_received(self) -> int:
        return len(self.chunk_ids)

    def _on_message(self, sock: socket.socket, conn_id: int, obj: object) -> None:
        entries = decode_forward_message(obj)
        options = entries[0].options if entries else _options_of(obj)
        chunk = options.get("chunk")
        chunk_id = _as_str(chunk, "chunk option") if chunk is not None else None
        with self._cond:
            n = self._per_conn.get(conn_id, 0) + 1
            self._per_conn[conn_id] = n
            if self.close_after_n_chunks is not None and n >= self.close_after_n_chunks:
                self.messages_dropped += 1
                self._cond.notify_all()
                raise _Close(reset=True)
            self.messages_received += 1
            if chunk_id is not None:
                self.chunk_ids.append(chunk_id)
            self.records.extend(
                ReceivedRecord(
                    tag=e.tag,
                    time_ns=time_to_ns(e.time),
                    record=e.record,
                    chunk_id=chunk_id,
                    conn=conn_id,
                )
                for e in entries
            )
            self._cond.notify_all()
        if chunk_id is None:
            return
        if self.garbage:
            sock.sendall(GARBAGE)
            return
        if not self.ack:
            return
        if self.ack_delay > 0 and self._stopping.wait(self.ack_delay):
            return  # stopped while waiting: no ack, as in a real outage
        sock.sendall(msgpack.packb({"ack": chunk_id}))
        with self._cond:
            self.acks_sent.append(chunk_id)
            self._cond.notify_all()

    def wait_for(self, what: int | RecordsPredicate, timeout: float = 10.0) -> list[ReceivedRecord]:
        """Wait until ``what`` holds: an int is a minimum record count, a callable gets a
        snapshot of the records. Returns that snapshot; AssertionError at the deadline."""
        predicate = _records_predicate(what)
        with self._cond:
            if _deadline_wait(self._cond, lambda: predicate(self.records), timeout):
                return list(self.records)
            raise AssertionError(
                f"{self!r}: condition not met after {timeout:g}s with {len(self.records)} "
                f"records, {self.messages_received} messages, errors={self.errors[-3:]}, "
                f"auth_failures={self.auth_failures[-3:]}, last={self.records[-3:]!r:.600}"
            )

    def wait_for_condition(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` (reading any attribute, e.g. ``messages_dropped``)."""
        with self._cond:
            if not _deadline_wait(self._cond, predicate, timeout):
                raise AssertionError(f"{self!r}: condition not met after {timeout:g}s")


def _options_of(obj: object) -> dict[str, Any]:
    """The option map of a message with no entries (an empty Forward or PackedForward)."""
    if isinstance(obj, list | tuple) and len(obj) == 3:
        return _options(obj[2])
    return {}


def count_packed_entries(payload: bytes) -> int:
    """How many msgpack objects ``payload`` holds, skipped without being built."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(payload), 1024))
    unpacker.feed(payload)
    n = 0
    while True:
        try:
            unpacker.skip()
        except msgpack.OutOfData:
            return n
        n += 1


class ForwardEntries(NamedTuple):
    """A Forward-mode entries array left undecoded: how many entries (``size``), and their
    msgpack bytes back to back (the shape of a PackedForward payload)."""

    size: int
    payload: bytes


_ARRAY_HEADERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


def lean_message(message: bytes) -> object:
    """One whole msgpack message decoded (``raw``), except that the entries array of a
    Forward-mode message (``[tag, [[time, record], ...], option?]``) becomes a
    :class:`ForwardEntries`: building every entry would cost a Python object per field."""
    unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(message), 1024))
    unpacker.feed(message)
    if message[0] not in _ARRAY_HEADERS:
        return unpacker.unpack()
    size = unpacker.read_array_header()
    if size < 2:
        return [unpacker.unpack() for _ in range(size)]
    tag = unpacker.unpack()
    if message[unpacker.tell()] not in _ARRAY_HEADERS:
        return [tag, *(unpacker.unpack() for _ in range(size - 1))]
    count = unpacker.read_array_header()
    start = unpacker.tell()
    for _ in range(count):
        unpacker.skip()
    entries = ForwardEntries(count, message[start : unpacker.tell()])
    return [tag, entries, *(unpacker.unpack() for _ in range(size - 2))]


class CountingReceiver(_ForwardServer):
    """A lean Forward server for benchmarks: counts entries, messages and bytes, and acks.

    Records are not kept. PackedForward entries are counted by skipping through them with a
    msgpack Unpacker; ``gzip`` payloads are decompressed first. Forward-mode entries (Fluent
    Bit's ``forward`` output sends these) are skipped too, not built (:func:`lean_message`).
    The handshake (``shared_key``) is supported; the other fault knobs of
    :class:`ForwardReceiver` are not.
    """

    _raw = True

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, ack: bool = True, **kw: Any):
        super().__init__(host=host, port=port, **kw)
        self.ack = ack
        self.entries = 0
        self.messages = 0
        self.bytes_received = 0
        self.first_message_at: float | None = None  # time.monotonic()
        self.last_message_at: float | None = None

    def __enter__(self) -> CountingReceiver:
        super().__enter__()
        return self

    def start(self) -> CountingReceiver:
        super().start()
        return self

    def _on_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n

    def _messages(self, sock: socket.socket, unpacker: msgpack.Unpacker) -> Iterator[object]:
        """Each message's bytes are found by skipping over it, then :func:`lean_message`."""
        pending = bytearray()
        base = 0  # the stream offset of pending[0]
        # Where the message being skipped began: after OutOfData, the unpacker keeps its
        # place inside the message (tell() moves on) and goes on from there with more data.
        start = unpacker.tell()
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise _ConnectionClosed
            self._on_bytes(len(data))
            unpacker.feed(data)
            pending += data
            while True:
                try:
                    unpacker.skip()
                except msgpack.OutOfData:
                    break
                end = unpacker.tell()
                yield lean_message(bytes(pending[start - base : end - base]))
                start = end
            del pending[: start - base]
            base = start

    def _on_message(self, sock: socket.socket, _conn_id: int, obj: object) -> None:
        if not isinstance(obj, list) or len(obj) < 2:
            raise SenderProtocolError(f"not a Forward message: {obj!r:.200}")
        second = obj[1]
        options: object = None
        if isinstance(second, ForwardEntries):
            options = obj[2] if len(obj) > 2 else None
            n = second.size
        elif isinstance(second, bytes):
            options = obj[2] if len(obj) > 2 else None
            if isinstance(options, dict) and options.get(b"compressed") == b"gzip":
                second = gunzip_members(second)
            n = count_packed_entries(second)
        elif isinstance(second, list):
            options = obj[2] if len(obj) > 2 else None
            n = len(second)
        else:
            options = obj[3] if len(obj) > 3 else None
            n = 1
        chunk = options.get(b"chunk") if isinstance(options, dict) else None
        if chunk is not None and self.ack:
            sock.sendall(msgpack.packb({"ack": _as_str(chunk, "chunk option")}))
        now = time.monotonic()
        with self._cond:
            self.entries += n
            self.messages += 1
            if self.first_message_at is None:
                self.first_message_at = now
            self.last_message_at = now
            self._cond.notify_all()

    def wait_for(
        self, what: int | Callable[[CountingReceiver], bool], timeout: float = 30.0
    ) -> int:
        """Wait until ``entries >= what`` (or ``what(self)``); returns ``entries``."""
        if isinstance(what, int):
            count = what

            def ready() -> bool:
                return self.entries >= count
        else:
            predicate = what

            def ready() -> bool:
                return predicate(self)

        with self._cond:
            if _deadline_wait(self._cond, ready, timeout):
                return self.entries
        raise AssertionError(
            f"{self!r}: {self.entries} entries in {self.messages} messages after {timeout:g}s; "
            f"errors={self.errors[-3:]}"
        )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": self.entries,
                "messages": self.messages,
                "bytes": self.bytes_received,
                "connections": self.connections_total,
                "errors": len(self.errors),
                "first_message_at": self.first_message_at,
                "last_message_at": self.last_message_at,
            }


# ---- the Node.js receiver (Fluent's FluentServer) ----------------------------------------


class NodeReceiverError(RuntimeError):
    """The Node receiver could not be started (node or @fluent-org/logger missing...)."""


class NodeReceiver:
    """``FluentServer`` from ``@fluent-org/logger`` in a Node process (tests/peers).

    ``security``: ``{"serverHostname", "sharedKey", "authorize", "userDict"}``;
    ``tls``: ``{"key", "cert", "ca", "requestCert"}`` (PEM text or file paths);
    ``ack``: False never acks. Records are dicts like :class:`ReceivedRecord` without
    ``chunk_id``/``conn`` but with ``time`` as sent (``[s, ns]`` for an EventTime, else
    a number). ``acked`` lists the chunk ids the library acked; ``stderr_lines`` and
    ``auth_failures`` come from the script's stderr.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        security: Mapping[str, Any] | None = None,
        tls: Mapping[str, Any] | None = None,
        ack: bool = True,
        startup_timeout: float = 20.0,
    ) -> None:
        self.port = port
        self.options: dict[str, Any] = {"host": "127.0.0.1", "ack": ack}
        if security is not None:
            self.options["security"] = dict(security)
        if tls is not None:
            self.options["tls"] = {k: str(v) if isinstance(v, Path) else v for k, v in tls.items()}
        self.startup_timeout = startup_timeout
        self.records: list[dict[str, Any]] = []
        self.acked: list[str] = []
        self.stderr_lines: list[str] = []
        self.auth_failures: list[str] = []
        self.starts = 0
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NodeReceiver {self.address} {state} records={len(self.records)}>"

    def __enter__(self) -> NodeReceiver:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def check_installed() -> str:
        """The path of ``node``; NodeReceiverError saying what to install if anything lacks."""
        node = shutil.which("node")
        if node is None:
            raise NodeReceiverError(
                "node is not on PATH: install Node.js 20 (apt-get install nodejs npm), "
                "then run `npm ci` in tests/peers (.ci/run does both)"
            )
        if not (PEERS_DIR / "node_modules" / "@fluent-org" / "logger").is_dir():
            raise NodeReceiverError(
                f"@fluent-org/logger is not installed: run `npm ci` in {PEERS_DIR} (.ci/run does)"
            )
        return node

    def start(self) -> NodeReceiver:
        if self.running:
            raise NodeReceiverError(f"{self!r} is already running")
        node = self.check_installed()
        options = {**self.options, "port": self.port}
        proc = subprocess.Popen(
            [node, str(NODE_SCRIPT), json.dumps(options)],
            cwd=PEERS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._proc = proc
        self.starts += 1
        listening: list[int] = []
        stdout_done = threading.Event()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            threading.Thread(
                target=self._read_stdout,
                args=(proc.stdout, listening, stdout_done),
                name="node-receiver stdout",
                daemon=True,
            ),
            threading.Thread(
                target=self._read_stderr,
                args=(proc.stderr,),
                name="node-receiver stderr",
                daemon=True,
            ),
        ]
        for reader in self._readers:
            reader.start()
        with self._cond:
            _deadline_wait(
                self._cond, lambda: bool(listening) or stdout_done.is_set(), self.startup_timeout
            )
        if not listening:
            self.stop()
            raise NodeReceiverError(
                f"fluent_server.js did not report listening within {self.startup_timeout:g}s; "
                f"stderr: {''.join(self.stderr_lines[-20:])}"
            )
        self.port = listening[0]
        return self

    def _read_stdout(self, stream: Any, listening: list[int], done: threading.Event) -> None:
        try:
            for line in stream:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    with self._cond:
                        self.stderr_lines.append(f"(stdout, not JSON) {line}")
                    continue
                with self._cond:
                    if "listening" in message:
                        listening.append(int(message["listening"]))
                    elif "acked" in message:
                        self.acked.append(message["acked"])
                    elif "tag" in message:
                        message["time_ns"] = _node_time_ns(message.get("time"))
                        self.records.append(message)
                    self._cond.notify_all()
        finally:
            done.set()
            with self._cond:
                self._cond.notify_all()

    def _read_stderr(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.stderr_lines.append(line)
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    message = None
                if isinstance(message, dict) and "auth_failure" in message:
                    self.auth_failures.append(str(message["auth_failure"]))
                self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the script's stdin (it exits), then terminate/kill at the deadline."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in self._readers:
            reader.join(timeout)
        self._readers = []

    def restart(self) -> NodeReceiver:
        """Stop, then start again on the same port (records are kept)."""
        self.stop()
        return self.start()

    def wait_for(
        self, what: int | Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Like :meth:`ForwardReceiver.wait_for`, on this receiver's records."""
        predicate = _records_predicate(what)
        with self._cond:
            if _deadline_wait(self._cond, lambda: predicate(self.records), timeout):
                return list(self.records)
            raise AssertionError(
                f"{self!r}: condition not met after {timeout:g}s with {len(self.records)} "
                f"records; stderr: {''.join(self.stderr_lines[-10:])!r}; "
                f"last={self.records[-3:]!r:.600}"
            )

    def wait_for_condition(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` (reading ``acked``, ``auth_failures``...)."""
        with self._cond:
            if not _deadline_wait(self._cond, predicate, timeout):
                raise AssertionError(
                    f"{self!r}: condition not met after {timeout:g}s; "
                    f"stderr: {''.join(self.stderr_lines[-10:])}"
                )


def _node_time_ns(value: object) -> int | None:
    if isinstance(value, list) and len(value) == 2:
        return int(value[0]) * 1_000_000_000 + int(value[1])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return time_to_ns(value)
    return None


# ---- TLS material -----------------------------------------------------------------------


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context for ``ForwardReceiver(tls=...)``; see tests.harness.certs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# ---- python -m tests.harness.receivers: a CountingReceiver process ------------------------


def main(argv: list[str] | None = None) -> int:
    """Run a CountingReceiver; print ``{"listening": port}``, then one JSON line of
    :meth:`CountingReceiver.stats` per line read on stdin; exit at stdin's end."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-ack", action="store_true")
    parser.add_argument("--shared-key", default=None)
    args = parser.parse_args(argv)
    receiver = CountingReceiver(
        host=args.host, port=args.port, ack=not args.no_ack, shared_key=args.shared_key
    ).start()
    print(json.dumps({"listening": receiver.port}), flush=True)
    try:
        for _ in sys.stdin:
            print(json.dumps(receiver.stats()), flush=True)
    finally:
        receiver.stop()
    print(json.dumps(receiver.stats()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
