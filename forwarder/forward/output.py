"""The Forward output: takes chunks from the buffer and delivers each one to one server.

Each chunk the buffer gives ends in exactly one ``delivered`` or ``stalled``; positions only
move on ``delivered``, so a chunk resent after a failure is at worst a duplicate. Which
server gets a chunk is :mod:`~forwarder.forward.balance`'s pure policy; the bytes travel on
:mod:`~forwarder.forward.connection`'s connections, made by the ``connect(server)`` given
to :class:`ForwardOutput` (real ones by default), and a heartbeat ``probe`` tells when an
unreachable server is back. A failure marks the server down for a backoff that depends on
its kind (:mod:`~forwarder.forward.errors`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from forwarder.chunks import Chunk, ChunkId
from forwarder.config import Endpoint, OutputConfig, ServerConfig
from forwarder.forward import tls
from forwarder.forward.balance import (
    ServerHealth,
    ServerState,
    SmoothWeightedRoundRobin,
    select_server,
)
from forwarder.forward.connection import ForwardConnection, HandshakeFactory, tcp_probe
from forwarder.forward.errors import ConnectionLostError, DeliveryError, FailureKind
from forwarder.forward.setup import uses_tls

# The name the output's lines carry in the log, as before forward/ was split into modules:
# users read it and filter on it.
log = logging.getLogger("forwarder.forward.client")

Delivered = Callable[[Chunk], Awaitable[None]]
Probe = Callable[[Endpoint, float], Awaitable[bool]]
"""``probe(endpoint, timeout_s)``: whether a TCP connect gets through (the heartbeat)."""


class Connection(Protocol):
    """What the output needs of a server's connection (:class:`ForwardConnection`)."""

    @property
    def is_open(self) -> bool: ...
    @property
    def idle_reused(self) -> bool: ...
    @property
    def window(self) -> int: ...
    @property
    def keepalive(self) -> bool: ...
    @property
    def generation(self) -> int: ...

    async def send(self, chunk: Chunk, *, expect_ack: bool) -> asyncio.Future[None]: ...
    async def wait_ack(self, future: asyncio.Future[None], deadline: float) -> None: ...
    async def aclose(self) -> None: ...


ConnectionFactory = Callable[[ServerConfig], Connection]
"""``connect(server)``: the connection to a server; it connects on its first send."""


def forward_connections(
    cfg: OutputConfig,
    ssl_context: ssl.SSLContext | None = None,
    handshake_factory: HandshakeFactory | None = None,
) -> ConnectionFactory:
    """The real ``connect``: a :class:`ForwardConnection` per server, with the output's
    timeouts, TLS (a context made from ``[output.tls]`` unless given) and handshake."""
    if ssl_context is None and uses_tls(cfg):
        ssl_context = tls.client_context(cfg.tls)

    def connect(server: ServerConfig) -> Connection:
        is_tls = server.endpoint.scheme == "tls"
        return ForwardConnection(
            server.endpoint,
            connect_timeout_s=cfg.connect_timeout.total_seconds(),
            ack_timeout_s=cfg.ack_timeout.total_seconds(),
            ssl_context=ssl_context if is_tls else None,
            server_hostname=tls.server_hostname(cfg.tls, server.endpoint.host) if is_tls else None,
            handshake_factory=handshake_factory,
        )

    return connect


ACK_RTT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of forwarder_server_ack_rtt_seconds's buckets."""


@dataclass(eq=False)
class Server:
    """One configured server: its connection, its health and its counters."""

    config: ServerConfig
    connection: Connection
    health: ServerHealth
    chunks_delivered: int = 0
    ack_tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    """One task per chunk sent to this server, awaiting its ack (the connection holds the
    acks; a task leaves this set once its chunk is delivered or set to go again)."""
    failed_generation: int = -1
    """The connection whose failure was last counted."""
    heartbeat: asyncio.Task[None] | None = field(default=None, repr=False)
    last_error: str | None = field(default=None, repr=False)
    failures: dict[str, int] = field(default_factory=dict, repr=False)
    """Failures counted (one per connection), by :attr:`DeliveryError.reason`."""
    ack_rtt_counts: list[int] = field(
        default_factory=lambda: [0] * (len(ACK_RTT_BUCKETS_S) + 1), repr=False
    )
    """Acks by round-trip time (send to ack), per bucket of ACK_RTT_BUCKETS_S, then +Inf."""
    ack_rtt_sum_s: float = 0.0

    @property
    def name(self) -> str:
        return str(self.config.endpoint)


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
        connect: ConnectionFactory | None = None,
        probe: Probe = tcp_probe,
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
        self._probe = probe
        self._expect_ack = cfg.require_ack
        self._ack_timeout_s = cfg.ack_timeout.total_seconds()
        self._wake = asyncio.Event()  # an ack, a failure, a heartbeat: look again
        self._balancer: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
        if connect is None:
            connect = forward_connections(cfg, ssl_context, handshake_factory)
        self.servers = [
            Server(
                config=server,
                connection=connect(server),
                health=ServerHealth(
                    cfg.retry_wait.total_seconds(), cfg.retry_max_wait.total_seconds(), rng=rng
                ),
            )
            for server in cfg.servers
        ]
        # Every chunk taken and not yet delivered or handed back, with the order it was
        # taken in (chunks recovered from the disk buffer have no seq: seq can't tell).
        self._held: dict[ChunkId, tuple[int, Chunk]] = {}
        self._taken = 0
        self._retry: dict[ChunkId, Chunk] = {}  # failed in flight: sent again first
        self._get_task: asyncio.Task[Chunk] | None = None
        self._crash: BaseException | None = None
        self._on_standby = False
        self._stalled_since: float | None = None
        self.chunks_sent = 0  # sends, a chunk sent again counting again
        self.chunks_retried = 0  # chunks set to go again after a failed send or a lost ack

    def __repr__(self) -> str:
        now = self._clock()
        up = sum(s.health.eligible(now) for s in self.servers)
        in_flight = sum(len(s.ack_tasks) for s in self.servers)
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
                self.chunks_retried += 1
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
                self.chunks_retried += 1
                continue
            self.chunks_sent += 1
            deadline = asyncio.get_running_loop().time() + self._ack_timeout_s
            task = asyncio.create_task(
                self._await_ack(
                    server, connection.generation, chunk, future, deadline, idle_reused
                ),
                name=f"ack {server.name}",
            )
            server.ack_tasks.add(task)
            task.add_done_callback(server.ack_tasks.discard)
            return True

    async def _room(self, server: Server) -> bool:
        """Wait until the server's connection can take one more chunk; False if the server
        is no longer eligible by then."""
        while len(server.ack_tasks) >= server.connection.window:
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
        this = asyncio.current_task()
        try:
            await server.connection.wait_ack(future, deadline)
        except DeliveryError as exc:
            server.ack_tasks.discard(this)
            self._count_failure(server, generation, exc, idle_reused=idle_reused)
            self._retry[chunk.chunk_id] = chunk
            self.chunks_retried += 1
            self._wake.set()
            return
        server.ack_tasks.discard(this)
        self._held.pop(chunk.chunk_id, None)
        rtt_s = asyncio.get_running_loop().time() - (deadline - self._ack_timeout_s)
        server.ack_rtt_counts[bisect.bisect_left(ACK_RTT_BUCKETS_S, rtt_s)] += 1
        server.ack_rtt_sum_s += rtt_s
        self._succeeded(server)
        self._wake.set()
        if not server.connection.keepalive and not server.ack_tasks:
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
        while any(server.ack_tasks for server in self.servers):
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
        tasks: list[asyncio.Task[Any]] = [t for s in self.servers for t in s.ack_tasks]
        tasks += [s.heartbeat for s in self.servers if s.heartbeat is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self.servers:
            server.heartbeat = None
            server.ack_tasks.clear()  # their acks will not be read: hand them back too
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
        server.failures[exc.reason] = server.failures.get(exc.reason, 0) + 1
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
                extra={"server": server.name, "reason": reason},
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
                extra={"server": server.name},
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
            if await self._probe(server.config.endpoint, self.cfg.connect_timeout.total_seconds()):
                log.debug("server %s: heartbeat connect succeeded", server.name)
                server.health.answered_heartbeat(self._clock())
                self._wake.set()
                return
