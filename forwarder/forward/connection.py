"""One Forward connection over asyncio: a thin shell that moves bytes between a socket and
the sans-I/O :class:`~forwarder.forward.protocol.ClientConnection`, which holds the state,
runs the handshake and keeps the chunks awaiting their acks.

A connection is made in three steps, all within ``connect_timeout``: TCP, then TLS for
``tls://`` servers, then the handshake when ``shared_key`` is set. Then chunks are written
and their acks awaited, up to ``tuning.CHUNKS_IN_FLIGHT`` at once (pipelined: a server reads them
in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import cast

from forwarder import tuning
from forwarder.config import Endpoint
from forwarder.forward import tls
from forwarder.forward.errors import (
    AckTimeoutError,
    AuthError,
    ConnectError,
    ConnectionLostError,
    DeliveryError,
    ServerProtocolError,
    TLSHandshakeError,
)
from forwarder.forward.handshake import AuthRefusedError, ClientHandshake, HandshakeError
from forwarder.forward.protocol import (
    Acked,
    ClientConnection,
    ConnState,
    HandshakeRequiredError,
    RemoteProtocolError,
    SendableChunk,
    ServerEvent,
)

# The name the output's lines carry in the log, as before forward/ was split into modules:
# users read it and filter on it.
log = logging.getLogger("forwarder.forward.client")

HandshakeFactory = Callable[[], ClientHandshake]
AckFuture = asyncio.Future[None]


class _Stream(asyncio.Protocol):
    """The bytes of one connection, fed into the sans-I/O :class:`ClientConnection` as they
    arrive, even while nobody waits: an ack resolves its chunk's future at once, and a HELO
    or an EOF on an idle connection is noticed before the next chunk is written. Also write
    flow control. The chunks awaiting their acks, with their futures, are the
    ClientConnection's."""

    def __init__(self, conn: ClientConnection[AckFuture]) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.lost: DeliveryError | None = None
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.lost is not None or self.conn.state is ConnState.CLOSED:
            return
        try:
            self.conn.receive_data(data)
            if self.conn.state is ConnState.AWAITING_ACK:
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
                future = cast(AckFuture | None, event.waiter)
                if future is not None and not future.done():
                    future.set_result(None)

    def _lose(self, error: DeliveryError) -> None:
        if self.lost is None:
            self.lost = error
        for future in self.conn.connection_lost():
            if future is not None and not future.done():
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

    def write_chunk(self, chunk: SendableChunk, *, expect_ack: bool) -> AckFuture | None:
        """Write the chunk; with ``expect_ack``, the future its ack resolves."""
        if self.lost is not None:
            raise self.lost
        if self.conn.state is ConnState.READY:
            self.poll()  # READY accepts no message: anything the server sent raises here
        future: AckFuture | None = self._loop.create_future() if expect_ack else None
        data = self.conn.send_chunk(chunk, expect_ack=expect_ack, waiter=future)
        assert self.transport is not None
        self.transport.write(data)
        return future

    def flush(self) -> None:
        """Write what the protocol wants sent (the PING)."""
        if self.lost is not None:
            raise self.lost
        data = self.conn.data_to_send()
        if data:
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
            async with asyncio.timeout(tuning.CONNECTION_CLOSE_TIMEOUT_S):
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
        return f"<ForwardConnection {self.endpoint} {state} chunks={self.in_flight}>"

    @property
    def in_flight(self) -> int:
        """Chunks written on the open connection and awaiting their acks."""
        stream = self._stream
        return stream.conn.awaiting_acks if stream is not None else 0

    @property
    def is_open(self) -> bool:
        """Connected, past the handshake, and nothing has gone wrong since."""
        stream = self._stream
        return stream is not None and stream.lost is None and stream.conn.is_ready

    @property
    def idle_reused(self) -> bool:
        """Open, with acks received before and none awaited now: a chunk written now is the
        first on a connection that sat idle (the server may have closed it meanwhile)."""
        stream = self._stream
        return (
            self.is_open
            and stream is not None
            and stream.conn.acks > 0
            and not stream.conn.awaiting_acks
        )

    @property
    def window(self) -> int:
        """How many chunks may await their acks at once on this connection."""
        return tuning.CHUNKS_IN_FLIGHT if self.keepalive else 1

    async def connect(self) -> None:
        await self.aclose()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        handshake = self._handshake_factory() if self._handshake_factory else None
        stream = _Stream(ClientConnection(handshake))
        await self._open(stream, deadline)
        self._stream = stream
        self.keepalive = True
        try:
            if handshake is not None:
                await self._handshake(stream, deadline)
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
        assert stream.transport is not None
        assert self._ssl is not None
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

    async def _handshake(self, stream: _Stream, deadline: float) -> None:
        """Move the handshake's bytes until the protocol says READY; only the errors are
        worded here."""
        conn = stream.conn
        try:
            async with asyncio.timeout_at(deadline):
                while not conn.is_ready:
                    await stream.next_event()
                    stream.flush()
        except TimeoutError as exc:
            if conn.state is ConnState.AWAITING_HELO:
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
            if conn.state is ConnState.AWAITING_HELO:
                raise ConnectionLostError(f"{exc} before its HELO") from exc
            # Fluent Bit's in_forward answers a wrong shared key (or a PING it can't read)
            # by closing the connection, without a PONG to give a reason.
            raise AuthError(
                f"{exc} instead of answering our PING: it refused the handshake without "
                "a reason (Fluent Bit does so when the shared key does not match)"
            ) from exc
        # A server that said keepalive=false closes after each chunk: one at a time, then.
        self.keepalive = conn.keepalive

    async def send(self, chunk: SendableChunk, *, expect_ack: bool) -> AckFuture:
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

    async def wait_ack(self, future: AckFuture, deadline: float) -> None:
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


async def tcp_probe(endpoint: Endpoint, timeout_s: float) -> bool:
    """Whether a TCP (or Unix socket) connect to ``endpoint`` succeeds within ``timeout_s``:
    the heartbeat that tells an unreachable server is back."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            if endpoint.scheme == "unix":
                transport, _ = await loop.create_unix_connection(asyncio.Protocol, endpoint.path)
            else:
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, endpoint.host, endpoint.port
                )
    except (OSError, TimeoutError):
        return False
    transport.close()
    return True
