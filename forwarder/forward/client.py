"""The asyncio side of the Forward output: connections, retries, several servers.

Protocol decisions live elsewhere: framing and acks in :mod:`forwarder.forward.protocol`,
the HELO/PING/PONG handshake in :mod:`forwarder.forward.handshake`, TLS contexts and error
sentences in :mod:`forwarder.forward.tls`. This layer moves bytes, keeps time, and decides
which server gets the next chunk.

One connection per server, kept open and reused for every chunk. A connection is made in
three steps, all within ``connect_timeout``: TCP, then TLS for ``tls://`` servers, then the
handshake when ``shared_key`` is set. Then chunks are written and their acks awaited, up to
``CHUNKS_IN_FLIGHT`` at once on a connection (pipelined: a server reads them in order).
Each chunk the buffer gives ends in exactly one ``delivered`` or ``stalled``; positions only
move on ``delivered``, so a chunk resent after a failure is at worst a duplicate.

A failure marks the server down for a backoff delay; what happens next depends on its kind:

==============  ==========================================  ====================================
kind            examples                                    back when
==============  ==========================================  ====================================
UNREACHABLE     connection refused, connect timeout          a heartbeat TCP connect succeeds,
                                                             or the backoff ends
REFUSED         untrusted certificate, handshake refused,    the backoff ends (a TCP connect
                bad PONG digest, HELO/shared_key mismatch    says nothing new: no heartbeat)
BROKEN          connection lost, no ack in time, garbage     the backoff ends
==============  ==========================================  ====================================

The pure parts (:func:`backoff_delays`, :class:`ServerHealth`,
:class:`SmoothWeightedRoundRobin`, :func:`select_server`) take the clock reading as an
argument and are tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast

from forwarder.backoff import backoff_delays
from forwarder.chunks import Chunk, ChunkId
from forwarder.config import Endpoint, OutputConfig, ServerConfig
from forwarder.forward import tls
from forwarder.forward.handshake import (
    AuthRefusedError,
    ClientHandshake,
    Credentials,
    HandshakeError,
    HandshakeState,
)
from forwarder.forward.protocol import (
    Acked,
    ClientConnection,
    ConnState,
    HandshakeRequiredError,
    Helo,
    Pong,
    RemoteProtocolError,
    ServerEvent,
)

log = logging.getLogger(__name__)

# How long closing a connection may wait for the transport to finish before aborting it.
CLOSE_TIMEOUT_S = 1.0
# Chunks that may await their acks at once on one connection (pipelined, in order). With one
# chunk in flight, a link's round trip caps the output at chunk_limit per RTT; with 4, the
# next chunks travel while the server works. bench/bench_output.py, 1 MiB chunks, MB/s for
# 1 / 4 in flight: RTT 2 ms 199 / 621, 10 ms 69 / 243, 50 ms 18 / 67 (74k / 284k lines/s).
# On loopback (bench/bench_pipeline.py) both are ~120k lines/s: reading is the limit there.
CHUNKS_IN_FLIGHT = 4


# --- errors, by kind ----------------------------------------------------------------------


class FailureKind(enum.Enum):
    """What a failure says about the server, which decides how it is tried again."""

    UNREACHABLE = "unreachable"
    """No TCP connection: a heartbeat TCP connect tells when it is back."""
    REFUSED = "refused"
    """It answers but won't take us (TLS, handshake): usually a configuration problem."""
    BROKEN = "broken"
    """It broke while delivering: connection lost, no ack in time, garbage."""


class DeliveryError(Exception):
    """A chunk could not be delivered over this connection; it will be sent again.

    Messages never hold a secret: the handshake's errors are built without them."""

    kind: ClassVar[FailureKind] = FailureKind.BROKEN


class ConnectError(DeliveryError):
    """No TCP connection: refused, unreachable, timed out."""

    kind = FailureKind.UNREACHABLE


class TLSHandshakeError(DeliveryError):
    """The TLS handshake failed: an untrusted certificate, a wrong name, no common version."""

    kind = FailureKind.REFUSED


class AuthError(DeliveryError):
    """The Forward handshake failed: refused credentials, a server we can't trust, or a
    server and a configuration that disagree about whether there is a handshake at all."""

    kind = FailureKind.REFUSED


class ConnectionLostError(DeliveryError):
    """The server closed or reset the connection."""


class AckTimeoutError(DeliveryError):
    """No ack within ack_timeout."""


class ServerProtocolError(DeliveryError):
    """The server sent something that isn't the Forward protocol."""


# --- server health (pure) -----------------------------------------------------------------


class ServerState(enum.Enum):
    UP = "UP"
    DOWN = "DOWN"


@dataclass
class ServerHealth:
    """Whether a server may be sent chunks. Pure: the caller passes the clock readings.

    ::

        UP --failed(kind, now)--> DOWN (retry_at = now + backoff)
        DOWN --failed--> DOWN (a longer backoff)
        DOWN --succeeded--> UP (the backoff starts over)
        DOWN --answered_heartbeat(now), while UNREACHABLE--> DOWN, eligible at once

    A DOWN server is *eligible* again from ``retry_at``: the next chunk tries it, and that
    try decides (``succeeded`` or ``failed``)."""

    first_wait_s: float
    max_wait_s: float
    rng: random.Random | None = field(default=None, repr=False)
    state: ServerState = ServerState.UP
    retry_at: float = 0.0
    failures: int = 0
    """Consecutive failed attempts."""
    kind: FailureKind | None = None
    """The kind of the last failure, while DOWN."""
    down_since: float | None = None
    _delays: Iterator[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._delays = backoff_delays(self.first_wait_s, self.max_wait_s, rng=self.rng)

    def eligible(self, now: float) -> bool:
        return self.state is ServerState.UP or now >= self.retry_at

    @property
    def wants_heartbeat(self) -> bool:
        return self.state is ServerState.DOWN and self.kind is FailureKind.UNREACHABLE

    def failed(self, kind: FailureKind, now: float) -> float:
        """Mark it down; returns the delay before it is eligible again."""
        if self.state is ServerState.UP:
            self.down_since = now
        self.state = ServerState.DOWN
        self.kind = kind
        self.failures += 1
        delay = next(self._delays)
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.state = ServerState.UP
        self.kind = None
        self.failures = 0
        self.down_since = None
        self.retry_at = 0.0
        self._delays = backoff_delays(self.first_wait_s, self.max_wait_s, rng=self.rng)

    def answered_heartbeat(self, now: float) -> None:
        """A TCP connect went through: an unreachable server may be tried at once."""
        if self.wants_heartbeat:
            self.retry_at = min(self.retry_at, now)


# --- choosing a server (pure) -------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


class SmoothWeightedRoundRobin(Generic[K]):
    """Nginx's smooth weighted round robin.

    Over every run of ``sum(weights)`` picks from the same members, each member is picked
    exactly ``weight`` times, and its picks are spread evenly (weights 3:1 give A A B A,
    not A A A B). When the set of members changes (a server goes down or comes back), the
    cycle starts over from zero, so nobody is owed picks from a past set."""

    def __init__(self) -> None:
        self._current: dict[K, int] = {}

    def pick(self, weights: Mapping[K, int]) -> K:
        if not weights:
            raise ValueError("pick() from no members")
        if weights.keys() != self._current.keys():
            self._current = dict.fromkeys(weights, 0)
        current = self._current
        total = 0
        best: K | None = None
        for member, weight in weights.items():
            current[member] += weight
            total += weight
            if best is None or current[member] > current[best]:
                best = member
        assert best is not None
        current[best] -= total
        return best


@dataclass(eq=False)
class Server:
    """One configured server: its connection, its health and its counters."""

    config: ServerConfig
    connection: ForwardConnection
    health: ServerHealth
    chunks_delivered: int = 0
    in_flight: dict[ChunkId, Chunk] = field(default_factory=dict, repr=False)
    """Chunks sent and awaiting their acks."""
    failed_generation: int = -1
    """The connection whose failure was last counted."""
    heartbeat: asyncio.Task[None] | None = field(default=None, repr=False)
    last_error: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.config.endpoint)


def select_server(
    servers: Sequence[Server],
    balancer: SmoothWeightedRoundRobin[int],
    now: float,
    exclude: frozenset[int] = frozenset(),
) -> int | None:
    """The index of the server for the next chunk, or None when none may take it.

    Eligible primaries share chunks by weight; standbys (by weight among themselves) only
    while no primary is eligible. Weight 0 takes a server out, as in Fluentd. ``exclude``:
    servers already tried for this chunk."""
    for standby in (False, True):
        weights = {
            index: server.config.weight
            for index, server in enumerate(servers)
            if server.config.standby is standby
            and server.config.weight > 0
            and index not in exclude
            and server.health.eligible(now)
        }
        if weights:
            return balancer.pick(weights)
    return None


# --- one connection -----------------------------------------------------------------------

HandshakeFactory = Callable[[], ClientHandshake]


class _Stream(asyncio.Protocol):
    """The bytes of one connection, fed into the sans-I/O :class:`ClientConnection` as they
    arrive, even while nobody waits: an ack resolves its chunk's future at once, and a HELO
    or an EOF on an idle connection is noticed before the next chunk is written. Also write
    flow control."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.lost: DeliveryError | None = None
        self.acks = 0
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._acks: dict[ChunkId, asyncio.Future[None]] = {}  # oldest first

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.lost is not None or self.conn.state is ConnState.CLOSED:
            return
        try:
            self.conn.receive_data(data)
            if self._acks:
                self._resolve_acks()
        except DeliveryError as exc:
            self.fail(exc)
        except RemoteProtocolError as exc:
            self.fail(ServerProtocolError(str(exc)))
        self._wake()

    def eof_received(self) -> bool | None:
        self._lose(ConnectionLostError("the server closed the connection"))
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._lose(ConnectionLostError("the server closed the connection"))
        else:
            self._lose(ConnectionLostError(f"the connection broke: {tls.describe_tls_error(exc)}"))
        if not self._closed.done():
            self._closed.set_result(None)
        self._resume()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        self._resume()

    # ours

    def _resolve_acks(self) -> None:
        while (event := self.poll()) is not None:
            if isinstance(event, Acked):  # ClientConnection checked it is one we await
                self.acks += 1
                future = self._acks.pop(ChunkId(event.chunk_id))
                if not future.done():
                    future.set_result(None)

    def _lose(self, error: DeliveryError) -> None:
        if self.lost is None:
            self.lost = error
        acks, self._acks = self._acks, {}
        for future in acks.values():
            if not future.done():
                future.set_exception(self.lost)
                # Marked as seen: when the output is stopping nobody awaits it any more,
                # and asyncio would log the error as never retrieved.
                future.exception()
        self._wake()

    def fail(self, error: DeliveryError) -> None:
        """Drop the connection: every chunk still awaiting its ack fails with ``error``."""
        self._lose(error)
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _resume(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    @property
    def awaiting_acks(self) -> int:
        return len(self._acks)

    def poll(self) -> ServerEvent | None:
        """The next event already received, if any."""
        try:
            return self.conn.next_event()
        except HandshakeRequiredError as exc:
            raise AuthError(str(exc)) from exc
        except RemoteProtocolError as exc:
            raise ServerProtocolError(str(exc)) from exc

    async def next_event(self) -> ServerEvent:
        """The next event (during the handshake); what was received before a close is still
        read first."""
        while True:
            event = self.poll()
            if event is not None:
                return event
            if self.lost is not None:
                raise self.lost
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def write_chunk(self, chunk: Chunk, *, expect_ack: bool) -> asyncio.Future[None] | None:
        """Write the chunk; with ``expect_ack``, the future its ack resolves."""
        if self.lost is not None:
            raise self.lost
        if not self._acks and self.poll() is not None:  # READY accepts nothing: poll raises
            raise ServerProtocolError("unexpected message from the server")
        data = self.conn.send_chunk(chunk, expect_ack=expect_ack)
        future: asyncio.Future[None] | None = None
        if expect_ack:
            future = self._acks[chunk.chunk_id] = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return future

    def write(self, data: bytes) -> None:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is full; returns early if the connection is
        gone (the chunks' futures tell what became of them)."""
        while self._writable is not None and self.lost is None:
            await asyncio.shield(self._writable)

    async def aclose(self) -> None:
        self._lose(ConnectionLostError("the connection was closed"))
        transport = self.transport
        if transport is None:
            return
        transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(self._closed)
        except TimeoutError:
            transport.abort()


class ForwardConnection:
    """One kept-alive connection to one server: connect (TCP, TLS, handshake), write chunks,
    and resolve each chunk's future when its ack comes. Several chunks may await their acks
    at once (``window``). A failure drops the connection and fails every chunk awaiting its
    ack; the next chunk opens a new connection."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout_s: float,
        ack_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        handshake_factory: HandshakeFactory | None = None,
    ) -> None:
        if endpoint.scheme == "tls" and ssl_context is None:
            raise ValueError(f"{endpoint} needs an SSL context")
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout_s
        self._ack_timeout = ack_timeout_s
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._handshake_factory = handshake_factory
        self._stream: _Stream | None = None
        self.keepalive = True
        """False when the server's HELO said so: then one chunk per connection."""
        self.generation = 0
        """How many connections were made; tells one connection's failures from the next's."""
        self.chunks_sent = 0

    def __repr__(self) -> str:
        stream = self._stream
        state = stream.conn.state.value if stream else "CLOSED"
        awaiting = stream.awaiting_acks if stream else 0
        return (
            f"<ForwardConnection {self.endpoint} {state} awaiting={awaiting} "
            f"chunks={self.chunks_sent}>"
        )

    @property
    def is_open(self) -> bool:
        """Connected, past the handshake, and nothing has gone wrong since."""
        stream = self._stream
        return (
            stream is not None
            and stream.lost is None
            and stream.conn.state in (ConnState.READY, ConnState.AWAITING_ACK)
        )

    @property
    def idle_reused(self) -> bool:
        """Open, with acks received before and none awaited now: a chunk written now is the
        first on a connection that sat idle (the server may have closed it meanwhile)."""
        stream = self._stream
        return self.is_open and stream is not None and stream.acks > 0 and not stream.awaiting_acks

    @property
    def window(self) -> int:
        """How many chunks may await their acks at once on this connection."""
        return CHUNKS_IN_FLIGHT if self.keepalive else 1

    async def connect(self) -> None:
        await self.aclose()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        handshake = self._handshake_factory() if self._handshake_factory else None
        stream = _Stream(ClientConnection(handshake=handshake is not None))
        await self._open(stream, deadline)
        self._stream = stream
        self.keepalive = True
        try:
            if handshake is not None:
                await self._handshake(stream, handshake, deadline)
        except BaseException:
            await self.aclose()
            raise
        self.generation += 1
        log.debug("%s: connected", self.endpoint)

    async def _open(self, stream: _Stream, deadline: float) -> None:
        """TCP, then TLS: separate steps, so that their failures are told apart."""
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            async with asyncio.timeout_at(deadline):
                if ep.scheme == "unix":
                    await loop.create_unix_connection(lambda: stream, ep.path)
                else:
                    await loop.create_connection(lambda: stream, ep.host, ep.port)
        except TimeoutError as exc:
            raise ConnectError(f"connect timed out after {self._connect_timeout:g}s") from exc
        except OSError as exc:
            raise ConnectError(_os_reason(exc)) from exc
        if ep.scheme != "tls":
            return
        assert stream.transport is not None and self._ssl is not None
        try:
            async with asyncio.timeout_at(deadline):
                transport = await loop.start_tls(
                    stream.transport,
                    stream,
                    self._ssl,
                    server_hostname=self._server_hostname,
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                )
        except TimeoutError as exc:
            stream.transport.abort()
            raise TLSHandshakeError(
                f"TLS handshake failed: no answer within {self._connect_timeout:g}s"
            ) from exc
        except OSError as exc:  # ssl.SSLError is an OSError
            stream.transport.abort()
            raise TLSHandshakeError(f"TLS handshake failed: {tls.describe_tls_error(exc)}") from exc
        if transport is None:  # the connection went away during the TLS handshake
            raise TLSHandshakeError("TLS handshake failed: the server closed the connection")
        stream.transport = transport

    async def _handshake(
        self, stream: _Stream, handshake: ClientHandshake, deadline: float
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                helo = await stream.next_event()
                if not isinstance(helo, Helo):  # ClientConnection lets only a HELO through
                    raise ServerProtocolError(f"expected HELO, got {type(helo).__name__}")
                stream.write(handshake.receive_helo(helo.message))
                pong = await stream.next_event()
                if not isinstance(pong, Pong):
                    raise ServerProtocolError(f"expected PONG, got {type(pong).__name__}")
                handshake.receive_pong(pong.message)
        except TimeoutError as exc:
            if handshake.state is HandshakeState.AWAITING_HELO:
                raise AuthError(
                    f"the server sent no HELO within {self._connect_timeout:g}s: [output] "
                    "shared_key is set, but the server does not ask for the handshake (is "
                    "security configured on the server?)"
                ) from exc
            raise AuthError(
                f"the server did not answer our PING within {self._connect_timeout:g}s"
            ) from exc
        except AuthRefusedError as exc:
            raise AuthError(str(exc)) from exc
        except HandshakeError as exc:
            raise AuthError(f"handshake failed, connection dropped: {exc}") from exc
        except ServerProtocolError as exc:
            raise AuthError(f"handshake failed, connection dropped: {exc}") from exc
        except ConnectionLostError as exc:
            if handshake.state is HandshakeState.AWAITING_HELO:
                raise ConnectionLostError(f"{exc} before its HELO") from exc
            # Fluent Bit's in_forward answers a wrong shared key (or a PING it can't read)
            # by closing the connection, without a PONG to give a reason.
            raise AuthError(
                f"{exc} instead of answering our PING: it refused the handshake without "
                "a reason (Fluent Bit does so when the shared key does not match)"
            ) from exc
        stream.conn.handshake_done()
        # A server that said keepalive=false closes after each chunk: one at a time, then.
        self.keepalive = handshake.keepalive is not False

    async def send(self, chunk: Chunk, *, expect_ack: bool) -> asyncio.Future[None]:
        """Write the chunk, on the open connection or a new one; returns the future of its
        ack (done at once without ``expect_ack``). A failure drops the connection, fails the
        chunks awaiting their acks on it, and raises a :class:`DeliveryError`."""
        if not self.is_open:
            await self.connect()
        stream = self._stream
        assert stream is not None
        try:
            future = stream.write_chunk(chunk, expect_ack=expect_ack)
            self.chunks_sent += 1
            async with asyncio.timeout(self._ack_timeout):
                await stream.drain()
        except TimeoutError as exc:
            error = AckTimeoutError(f"no room to write within {self._ack_timeout:g}s")
            self.fail(error)
            raise error from exc
        except DeliveryError as exc:
            self.fail(exc)
            raise
        if future is None:
            if stream.lost is not None:
                raise stream.lost
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
        return future

    async def wait_ack(self, future: asyncio.Future[None], deadline: float) -> None:
        """Wait for an ack future until ``deadline`` (loop time). No ack by then drops the
        connection (every chunk awaiting its ack on it fails) and raises AckTimeoutError."""
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(future)
        except TimeoutError as exc:
            if not future.done():
                self.fail(AckTimeoutError(f"no ack within {self._ack_timeout:g}s"))
            with contextlib.suppress(DeliveryError):
                future.result()  # retrieved: the one error below speaks for it
            raise AckTimeoutError(f"no ack within {self._ack_timeout:g}s") from exc

    def fail(self, error: DeliveryError) -> None:
        """Drop the connection: every chunk awaiting its ack on it fails with ``error``."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.conn.close()
            stream.fail(error)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.conn.close()
        await stream.aclose()


def _os_reason(exc: OSError) -> str:
    """'connection refused', not asyncio's "Connect call failed ('10.0.0.5', 24224)"."""
    if isinstance(exc, socket.gaierror):
        return f"can't resolve the host name: {exc.strerror}"
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return tls.describe_tls_error(exc)


# --- several servers ----------------------------------------------------------------------

Delivered = Callable[[Chunk], Awaitable[None]]


def handshake_factory(cfg: OutputConfig) -> HandshakeFactory | None:
    """A fresh :class:`ClientHandshake` per connection when ``shared_key`` is set (the
    secrets are read now, from the config or their files)."""
    shared_key = cfg.secret_shared_key()
    if shared_key is None:
        return None
    credentials = Credentials(
        self_hostname=cfg.self_hostname,
        shared_key=shared_key,
        username=cfg.username or "",
        password=cfg.secret_password() or "",
    )
    return lambda: ClientHandshake(credentials)


def uses_tls(cfg: OutputConfig) -> bool:
    return any(server.endpoint.scheme == "tls" for server in cfg.servers)


def check_output(cfg: OutputConfig) -> None:
    """Read the files the output needs (secrets, TLS certificates and keys) as it will at
    start; a :class:`~forwarder.config.ConfigError` names the key and the file. Nothing
    read is kept or shown."""
    if cfg.mode != "forward":
        return
    cfg.secret_shared_key()
    cfg.secret_password()
    if uses_tls(cfg):
        tls.client_context(cfg.tls)


class ForwardOutput:
    """Takes chunks from the buffer and delivers each one to one server.

    Primaries share chunks by weight (smooth weighted round robin); standbys are used only
    while no primary is eligible. Up to ``window`` chunks await their acks at once on each
    server's connection. A chunk whose server fails is sent again, unchanged, to the next
    server, before any newer chunk. When no server can take a chunk, it is handed back
    (``stalled``) and the output waits for a server.

    Each chunk taken from ``get_chunk`` ends in exactly one ``delivered`` or ``stalled``;
    when the output is cancelled, the chunks it still holds are handed back, newest first,
    so that the buffer has them oldest first.
    """

    def __init__(
        self,
        cfg: OutputConfig,
        *,
        get_chunk: Callable[[], Awaitable[Chunk]],
        delivered: Delivered,
        stalled: Delivered,
        ssl_context: ssl.SSLContext | None = None,
        handshake_factory: HandshakeFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self._get_chunk = get_chunk
        self._delivered = delivered
        self._stalled = stalled
        self._clock = clock
        self._sleep = sleep
        self._expect_ack = cfg.require_ack
        self._ack_timeout_s = cfg.ack_timeout.total_seconds()
        self._wake = asyncio.Event()  # an ack, a failure, a heartbeat: look again
        self._balancer: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
        if ssl_context is None and uses_tls(cfg):
            ssl_context = tls.client_context(cfg.tls)
        self.servers = [
            Server(
                config=server,
                connection=ForwardConnection(
                    server.endpoint,
                    connect_timeout_s=cfg.connect_timeout.total_seconds(),
                    ack_timeout_s=self._ack_timeout_s,
                    ssl_context=ssl_context if server.endpoint.scheme == "tls" else None,
                    server_hostname=tls.server_hostname(cfg.tls, server.endpoint.host)
                    if server.endpoint.scheme == "tls"
                    else None,
                    handshake_factory=handshake_factory,
                ),
                health=ServerHealth(
                    cfg.retry_wait.total_seconds(), cfg.retry_max_wait.total_seconds(), rng=rng
                ),
            )
            for server in cfg.servers
        ]
        # Every chunk taken and not yet delivered or handed back, with the order it was
        # taken in (chunks read back from the disk buffer all have seq 0).
        self._held: dict[ChunkId, tuple[int, Chunk]] = {}
        self._taken = 0
        self._retry: dict[ChunkId, Chunk] = {}  # failed in flight: sent again first
        self._get_task: asyncio.Task[Chunk] | None = None
        self._acks: set[asyncio.Task[None]] = set()
        self._crash: BaseException | None = None
        self._on_standby = False
        self._stalled_since: float | None = None

    def __repr__(self) -> str:
        now = self._clock()
        up = sum(s.health.eligible(now) for s in self.servers)
        in_flight = sum(len(s.in_flight) for s in self.servers)
        return (
            f"<ForwardOutput servers={len(self.servers)} eligible={up} in_flight={in_flight} "
            f"retry={len(self._retry)}>"
        )

    async def run(self) -> None:
        if uses_tls(self.cfg) and not self.cfg.tls.verify:
            log.warning(
                "[output.tls] verify = false: server certificates and names are not checked, "
                "so anyone on the network path can pose as the server"
            )
        try:
            while True:
                chunk = await self._next_chunk()
                if await self._dispatch(chunk):
                    continue
                self._retry[chunk.chunk_id] = chunk
                await self._hand_back_held()
                await self._wait_for_a_server()
        finally:
            await self._hand_back_and_close()

    # --- taking chunks --------------------------------------------------------------------

    async def _next_chunk(self) -> Chunk:
        """The next chunk to send: chunks that failed in flight first, oldest first, then
        the buffer's. A ``get_chunk`` still pending when a failed chunk comes first is kept
        for the next call, not cancelled (it may be reading from disk); only
        :meth:`_hand_back_held` cancels it."""
        while True:
            self._raise_crash()
            if self._retry:
                chunk_id = min(self._retry, key=lambda c: self._held[c][0])
                return self._retry.pop(chunk_id)
            if self._get_task is None:
                self._get_task = asyncio.create_task(self._get(), name="output get")
            if self._get_task.done():
                task, self._get_task = self._get_task, None
                chunk = task.result()
                self._held[chunk.chunk_id] = (self._taken, chunk)
                self._taken += 1
                return chunk
            self._wake.clear()
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({self._get_task, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()

    async def _get(self) -> Chunk:
        return await self._get_chunk()

    def _raise_crash(self) -> None:
        if self._crash is not None:
            raise self._crash

    # --- sending --------------------------------------------------------------------------

    async def _dispatch(self, chunk: Chunk) -> bool:
        """Send the chunk to the next server, then the next, ...; False when none is left.
        Waits while the chosen server's window is full."""
        tried: set[int] = set()
        while True:
            index = select_server(self.servers, self._balancer, self._clock(), frozenset(tried))
            if index is None:
                self._note_stall()
                return False
            server = self.servers[index]
            if not await self._room(server):
                continue  # it failed meanwhile: choose again
            tried.add(index)
            connection = server.connection
            idle_reused = connection.idle_reused
            try:
                future = await connection.send(chunk, expect_ack=self._expect_ack)
            except DeliveryError as exc:
                self._count_failure(server, None, exc, idle_reused=False)
                continue
            server.in_flight[chunk.chunk_id] = chunk
            deadline = asyncio.get_running_loop().time() + self._ack_timeout_s
            task = asyncio.create_task(
                self._await_ack(
                    server, connection.generation, chunk, future, deadline, idle_reused
                ),
                name=f"ack {server.name}",
            )
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)
            return True

    async def _room(self, server: Server) -> bool:
        """Wait until the server's connection can take one more chunk; False if the server
        is no longer eligible by then."""
        while len(server.in_flight) >= server.connection.window:
            self._wake.clear()
            await self._wake.wait()
            self._raise_crash()
        return server.health.eligible(self._clock())

    async def _await_ack(
        self,
        server: Server,
        generation: int,
        chunk: Chunk,
        future: asyncio.Future[None],
        deadline: float,
        idle_reused: bool,
    ) -> None:
        try:
            await server.connection.wait_ack(future, deadline)
        except DeliveryError as exc:
            server.in_flight.pop(chunk.chunk_id, None)
            self._count_failure(server, generation, exc, idle_reused=idle_reused)
            self._retry[chunk.chunk_id] = chunk
            self._wake.set()
            return
        server.in_flight.pop(chunk.chunk_id, None)
        self._held.pop(chunk.chunk_id, None)
        self._succeeded(server)
        self._wake.set()
        if not server.connection.keepalive and not server.in_flight:
            await server.connection.aclose()
        try:
            await self._delivered(chunk)
        except Exception as exc:  # a bug downstream: the output stops with it, loudly
            self._crash = exc
            self._wake.set()

    def _count_failure(
        self, server: Server, generation: int | None, exc: DeliveryError, *, idle_reused: bool
    ) -> None:
        """One failure per connection, however many chunks were in flight on it."""
        if generation is not None:
            if generation == server.failed_generation:
                return
            server.failed_generation = generation
            if idle_reused and isinstance(exc, ConnectionLostError):
                # The server (or a middlebox) closed the connection while it was idle, and
                # it went unnoticed until this chunk: not a failure, the chunk goes again.
                log.debug("server %s: %s; sending again on a new connection", server.name, exc)
                return
        else:
            server.failed_generation = server.connection.generation
        self._failed(server, exc)

    # --- no server ------------------------------------------------------------------------

    def _next_retry_at(self) -> float:
        usable = [s.health.retry_at for s in self.servers if s.config.weight > 0]
        return min(usable, default=self._clock() + self.cfg.retry_max_wait.total_seconds())

    def _note_stall(self) -> None:
        if self._stalled_since is not None:
            return
        now = self._clock()
        self._stalled_since = now
        log.warning(
            "no server can take chunks: they wait in the buffer (next try in %.1fs, or "
            "sooner when a heartbeat gets through)",
            max(0.0, self._next_retry_at() - now),
        )

    async def _hand_back_held(self) -> None:
        """No server can take chunks: hand every chunk held back to the buffer, newest
        first, so that the buffer has them oldest first, ahead of the rest (with a disk
        buffer, they and its memory queue go to disk, and their positions commit).

        What is in flight is waited for first (with no server up, it fails or is acked
        soon). A pending ``get_chunk`` is cancelled first, or it would take the first chunk
        handed back at once, ahead of older ones."""
        while any(server.in_flight for server in self.servers):
            self._wake.clear()
            await self._wake.wait()
            self._raise_crash()
        get_task, self._get_task = self._get_task, None
        if get_task is not None:
            if not get_task.done():
                get_task.cancel()
                await asyncio.gather(get_task, return_exceptions=True)
            if not get_task.cancelled():
                chunk = get_task.result()
                self._held[chunk.chunk_id] = (self._taken, chunk)
                self._taken += 1
        self._retry.clear()
        held = sorted(self._held.values(), key=lambda item: item[0], reverse=True)
        self._held.clear()
        for _, chunk in held:
            await self._stalled(chunk)

    async def _wait_for_a_server(self) -> None:
        wake = self._next_retry_at()
        now = self._clock()
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, wake - now)):
                await self._wake.wait()

    # --- stopping -------------------------------------------------------------------------

    async def _hand_back_and_close(self) -> None:
        """Stop every task (awaited: none is left behind), hand back every chunk still held,
        newest first, and close the connections."""
        tasks: list[asyncio.Task[Any]] = [*self._acks]
        tasks += [s.heartbeat for s in self.servers if s.heartbeat is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self.servers:
            server.heartbeat = None
            server.in_flight.clear()  # their acks will not be read: hand them back too
        try:
            await self._hand_back_held()
        finally:
            for server in self.servers:
                await server.connection.aclose()

    async def aclose(self) -> None:
        """Close the connections and stop the heartbeats (``run`` does it when cancelled)."""
        await self._hand_back_and_close()

    # --- health ---------------------------------------------------------------------------

    def _failed(self, server: Server, exc: DeliveryError) -> None:
        now = self._clock()
        was_up = server.health.state is ServerState.UP
        delay = server.health.failed(exc.kind, now)
        reason = f"{type(exc).__name__}: {exc}"
        if was_up or reason != server.last_error:
            server.last_error = reason
            log.log(
                logging.ERROR if exc.kind is FailureKind.REFUSED else logging.WARNING,
                "server %s: %s; marked down, next try in %.1fs%s (logged again when the "
                "reason changes)",
                server.name,
                exc,
                delay,
                ", or sooner when a heartbeat connect gets through"
                if exc.kind is FailureKind.UNREACHABLE and self._heartbeat_s > 0
                else "",
            )
        else:
            log.debug(
                "server %s: attempt %d failed: %s; next try in %.1fs",
                server.name,
                server.health.failures,
                exc,
                delay,
            )
        probing = server.heartbeat is not None and not server.heartbeat.done()
        if server.health.wants_heartbeat and self._heartbeat_s > 0 and not probing:
            server.heartbeat = asyncio.create_task(
                self._heartbeat(server), name=f"heartbeat {server.name}"
            )

    def _succeeded(self, server: Server) -> None:
        server.chunks_delivered += 1
        health = server.health
        if health.state is ServerState.DOWN:
            log.info(
                "server %s: delivering again after %d failed attempts over %.1fs",
                server.name,
                health.failures,
                self._clock() - (health.down_since or self._clock()),
            )
        health.succeeded()
        server.last_error = None
        if self._stalled_since is not None:
            log.info(
                "delivering again after %.1fs without a server",
                self._clock() - self._stalled_since,
            )
            self._stalled_since = None
        if server.config.standby and not self._on_standby:
            self._on_standby = True
            log.warning("no primary server is up: standby %s takes the chunks", server.name)
        elif not server.config.standby and self._on_standby:
            self._on_standby = False
            log.info("primary server %s is up: the standbys are idle again", server.name)

    @property
    def _heartbeat_s(self) -> float:
        return self.cfg.heartbeat_interval.total_seconds()

    async def _heartbeat(self, server: Server) -> None:
        """While a server is unreachable, try a TCP connect every heartbeat_interval; the
        first that succeeds makes it eligible again without waiting out its backoff."""
        while server.health.wants_heartbeat:
            await self._sleep(self._heartbeat_s)
            if not server.health.wants_heartbeat:
                return
            if await self._probe(server.config.endpoint):
                log.debug("server %s: heartbeat connect succeeded", server.name)
                server.health.answered_heartbeat(self._clock())
                self._wake.set()
                return

    async def _probe(self, endpoint: Endpoint) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.cfg.connect_timeout.total_seconds()):
                if endpoint.scheme == "unix":
                    transport, _ = await loop.create_unix_connection(
                        asyncio.Protocol, endpoint.path
                    )
                else:
                    transport, _ = await loop.create_connection(
                        asyncio.Protocol, endpoint.host, endpoint.port
                    )
        except (OSError, TimeoutError):
            return False
        transport.close()
        return True
