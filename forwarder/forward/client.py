"""The asyncio side of the Forward output: connections, retries, several servers.

All protocol decisions live in :mod:`forwarder.forward.protocol` (and the handshake module);
this layer only moves bytes, keeps time, and decides which server gets the next chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from forwarder.config import Endpoint, OutputConfig, ServerConfig
from forwarder.forward import protocol
from forwarder.forward.protocol import Acked, Chunk, ClientConnection, ConnState, Helo, Pong

log = logging.getLogger(__name__)

READ_SIZE = 65536


# --- errors, by phase ---------------------------------------------------------------------


class DeliveryError(Exception):
    """A chunk could not be delivered over this connection; it will be sent again."""

    connect_phase = False


class ConnectError(DeliveryError):
    """The server could not be reached (refused, unreachable, TLS failure)."""

    connect_phase = True


class ConnectionLostError(DeliveryError):
    """The server closed or reset the connection."""


class AckTimeoutError(DeliveryError):
    """No ack within ack_timeout."""


class ServerProtocolError(DeliveryError):
    """The server sent something that isn't the Forward protocol."""


class AuthError(DeliveryError):
    """The handshake failed: refused credentials, or a server we can't trust."""


# --- backoff ------------------------------------------------------------------------------


def backoff_delays(
    first_s: float, max_s: float, *, rng: random.Random | None = None
) -> Iterator[float]:
    """Exponential backoff with full jitter on the upper half: first, 2*first, ... max.

    Each delay is drawn from [d/2, d], so that many collectors restarted together don't
    reconnect in step, while the wait still grows."""
    rand = rng or random.Random()
    delay = first_s
    while True:
        yield rand.uniform(delay / 2, delay)
        delay = min(delay * 2, max_s)


# --- one connection -----------------------------------------------------------------------

HandshakeFactory = Callable[[], "HandshakeLike | None"]


class HandshakeLike:  # the shape forwarder.forward.handshake.ClientHandshake provides
    def receive_helo(self, message: object) -> bytes:
        raise NotImplementedError

    def receive_pong(self, message: object) -> None:
        raise NotImplementedError


class ForwardConnection:
    """One connection to one server: connect (with TLS and handshake), send, await acks."""

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
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout_s
        self._ack_timeout = ack_timeout_s
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._handshake_factory = handshake_factory
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn: ClientConnection | None = None
        self.chunks_sent = 0

    def __repr__(self) -> str:
        state = self._conn.state.value if self._conn else "NEW"
        return f"<ForwardConnection {self.endpoint} {state} chunks={self.chunks_sent}>"

    @property
    def is_open(self) -> bool:
        return (
            self._conn is not None
            and self._conn.state is ConnState.READY
            and self._reader is not None
            and not self._reader.at_eof()
        )

    async def connect(self) -> None:
        await self.aclose()
        ep = self.endpoint
        try:
            async with asyncio.timeout(self._connect_timeout):
                if ep.scheme == "unix":
                    reader, writer = await asyncio.open_unix_connection(ep.path, limit=READ_SIZE)
                else:
                    reader, writer = await asyncio.open_connection(
                        ep.host,
                        ep.port,
                        ssl=self._ssl if ep.scheme == "tls" else None,
                        server_hostname=self._server_hostname if ep.scheme == "tls" else None,
                        limit=READ_SIZE,
                    )
        except TimeoutError as exc:
            raise ConnectError(f"connect timed out after {self._connect_timeout:g}s") from exc
        except ssl.SSLError as exc:
            from forwarder.forward.tls import describe_tls_error

            raise ConnectError(f"TLS handshake failed: {describe_tls_error(exc)}") from exc
        except OSError as exc:
            raise ConnectError(exc.strerror or str(exc)) from exc
        self._reader, self._writer = reader, writer
        handshake = self._handshake_factory() if self._handshake_factory else None
        self._conn = ClientConnection(handshake=handshake is not None)
        if handshake is not None:
            try:
                await self._handshake(handshake)
            except BaseException:
                await self.aclose()
                raise

    async def _handshake(self, handshake: HandshakeLike) -> None:
        from forwarder.forward.handshake import AuthRefusedError, HandshakeError

        try:
            async with asyncio.timeout(self._ack_timeout):
                helo = await self._next_event()
                assert isinstance(helo, Helo)
                await self._write(handshake.receive_helo(helo.message))
                pong = await self._next_event()
                assert isinstance(pong, Pong)
                handshake.receive_pong(pong.message)
        except TimeoutError as exc:
            raise AuthError("no handshake reply within ack_timeout") from exc
        except AuthRefusedError as exc:
            raise AuthError(f"the server refused authentication: {exc}") from exc
        except HandshakeError as exc:
            raise AuthError(f"handshake failed: {exc}") from exc
        assert self._conn is not None
        self._conn.handshake_done()

    async def _write(self, data: bytes) -> None:
        assert self._writer is not None
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            raise ConnectionLostError(f"write failed: {exc}") from exc

    async def _next_event(self) -> protocol.ServerEvent:
        assert self._conn is not None and self._reader is not None
        while True:
            try:
                event = self._conn.next_event()
            except protocol.RemoteProtocolError as exc:
                raise ServerProtocolError(str(exc)) from exc
            if event is not None:
                return event
            try:
                data = await self._reader.read(READ_SIZE)
            except OSError as exc:
                raise ConnectionLostError(exc.strerror or str(exc)) from exc
            if not data:
                raise ConnectionLostError("the server closed the connection")
            try:
                self._conn.receive_data(data)
            except protocol.RemoteProtocolError as exc:
                raise ServerProtocolError(str(exc)) from exc

    async def send_chunk(self, chunk: Chunk, *, expect_ack: bool) -> None:
        if not self.is_open:
            await self.connect()
        assert self._conn is not None
        data = self._conn.send_chunk(chunk, expect_ack=expect_ack)
        await self._write(data)
        self.chunks_sent += 1
        if not expect_ack:
            return
        try:
            async with asyncio.timeout(self._ack_timeout):
                event = await self._next_event()
        except TimeoutError as exc:
            await self.aclose()
            raise AckTimeoutError(f"no ack within {self._ack_timeout:g}s") from exc
        except DeliveryError:
            await self.aclose()
            raise
        assert isinstance(event, Acked)

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if self._conn is not None:
            self._conn.close()
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()


# --- several servers ----------------------------------------------------------------------


@dataclass
class Server:
    config: ServerConfig
    connection: ForwardConnection
    delays: Iterator[float]
    healthy: bool = True
    down_until: float = 0.0
    last_failure_connect: bool = False
    failures: int = 0
    failing_since: float | None = None
    current_weight: int = 0
    chunks_delivered: int = 0
    probe: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.config.endpoint)


Delivered = Callable[[Chunk], Awaitable[None]]


class ForwardOutput:
    """Takes chunks from the buffer and delivers each one to one server.

    Primaries share chunks by weight (smooth weighted round robin); standbys are used only
    while no primary is healthy. A failing server is marked down, probed with a TCP connect
    every ``heartbeat_interval`` while its failures were connection failures, and otherwise
    waits out its backoff. The chunk is resent, unchanged, to whichever server is next.
    """

    def __init__(
        self,
        cfg: OutputConfig,
        *,
        get_chunk: Callable[[], Awaitable[Chunk]],
        delivered: Delivered,
        ssl_context: ssl.SSLContext | None = None,
        handshake_factory: HandshakeFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self._get_chunk = get_chunk
        self._delivered = delivered
        self._clock = clock
        self._sleep = sleep
        self._expect_ack = cfg.require_ack
        self._changed = asyncio.Event()
        self.servers = [
            Server(
                config=server,
                connection=ForwardConnection(
                    server.endpoint,
                    connect_timeout_s=cfg.connect_timeout.total_seconds(),
                    ack_timeout_s=cfg.ack_timeout.total_seconds(),
                    ssl_context=ssl_context,
                    server_hostname=cfg.tls.server_name or server.endpoint.host or None,
                    handshake_factory=handshake_factory,
                ),
                delays=backoff_delays(
                    cfg.retry_wait.total_seconds(), cfg.retry_max_wait.total_seconds()
                ),
            )
            for server in cfg.servers
        ]
        self.in_flight: Chunk | None = None

    def __repr__(self) -> str:
        up = sum(s.healthy for s in self.servers)
        return f"<ForwardOutput servers={len(self.servers)} healthy={up}>"

    def pick(self) -> Server | None:
        now = self._clock()
        for server in self.servers:
            if not server.healthy and now >= server.down_until:
                server.healthy = True
        for standby in (False, True):
            candidates = [s for s in self.servers if s.healthy and s.config.standby is standby]
            candidates = [s for s in candidates if s.config.weight > 0] or candidates
            if candidates:
                return _smooth_weighted(candidates)
        return None

    async def run(self) -> None:
        try:
            while True:
                chunk = await self._get_chunk()
                self.in_flight = chunk
                await self._deliver(chunk)
                self.in_flight = None
                await self._delivered(chunk)
        finally:
            for server in self.servers:
                if server.probe is not None:
                    server.probe.cancel()
            for server in self.servers:
                await server.connection.aclose()

    async def _deliver(self, chunk: Chunk) -> None:
        while True:
            server = self.pick()
            if server is None:
                await self._wait_for_a_server()
                continue
            try:
                await server.connection.send_chunk(chunk, expect_ack=self._expect_ack)
            except DeliveryError as exc:
                self._failed(server, exc)
                continue
            self._succeeded(server)
            return

    async def _wait_for_a_server(self) -> None:
        now = self._clock()
        wake = min(s.down_until for s in self.servers)
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, wake - now)):
                await self._changed.wait()

    def _failed(self, server: Server, exc: DeliveryError) -> None:
        now = self._clock()
        server.failures += 1
        server.healthy = False
        server.last_failure_connect = exc.connect_phase
        delay = next(server.delays)
        server.down_until = now + delay
        if server.failing_since is None:
            server.failing_since = now
            log.warning(
                "server %s: delivery failed: %s; retrying with backoff (logged once until it "
                "recovers)",
                server.name,
                exc,
            )
        else:
            log.debug("server %s: attempt %d failed: %s", server.name, server.failures, exc)
        if exc.connect_phase and (server.probe is None or server.probe.done()):
            server.probe = asyncio.create_task(
                self._heartbeat(server), name=f"heartbeat {server.name}"
            )

    def _succeeded(self, server: Server) -> None:
        server.chunks_delivered += 1
        if server.failing_since is not None:
            log.info(
                "server %s: delivering again after %d failed attempts over %.1fs",
                server.name,
                server.failures,
                self._clock() - server.failing_since,
            )
        server.failures = 0
        server.failing_since = None
        server.delays = backoff_delays(
            self.cfg.retry_wait.total_seconds(), self.cfg.retry_max_wait.total_seconds()
        )

    async def _heartbeat(self, server: Server) -> None:
        """While a server refuses connections, try a TCP connect every heartbeat_interval;
        the first that succeeds makes it eligible again without waiting out its backoff."""
        interval = self.cfg.heartbeat_interval.total_seconds()
        ep = server.config.endpoint
        while not server.healthy and server.last_failure_connect:
            await self._sleep(interval)
            try:
                async with asyncio.timeout(self.cfg.connect_timeout.total_seconds()):
                    if ep.scheme == "unix":
                        _, writer = await asyncio.open_unix_connection(ep.path)
                    else:
                        _, writer = await asyncio.open_connection(ep.host, ep.port)
            except (OSError, TimeoutError):
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if not server.healthy:
                server.down_until = self._clock()
                self._changed.set()
            return


def _smooth_weighted(candidates: list[Server]) -> Server:
    """Nginx's smooth weighted round robin: exact shares, evenly interleaved."""
    total = 0
    best: Server | None = None
    for server in candidates:
        weight = max(server.config.weight, 1) if len(candidates) == 1 else server.config.weight
        server.current_weight += weight
        total += weight
        if best is None or server.current_weight > best.current_weight:
            best = server
    assert best is not None
    best.current_weight -= total
    return best
