"""ForwardOutput's dispatch over scripted connections, injected with a fake clock, sleep
and heartbeat probe: failover, retries, heartbeats, standbys, windows, hand-back."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from forwarder.chunks import Chunk, ChunkId
from forwarder.config import OutputConfig, ServerConfig, config_from_dict
from forwarder.forward.balance import ServerState
from forwarder.forward.errors import (
    AckTimeoutError,
    AuthError,
    ConnectError,
    ConnectionLostError,
    DeliveryError,
    FailureKind,
)
from forwarder.forward.output import ForwardOutput
from tests.helpers import run, seq_of


def output_config(*servers: dict[str, Any] | str, **output: Any) -> OutputConfig:
    return config_from_dict({"output": {"servers": list(servers), **output}}, env={}).output


# --- ForwardOutput over scripted connections ----------------------------------------------


class FakeTime:
    """An injected clock and sleep: sleepers wake only when the test advances the time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    @property
    def sleeping(self) -> int:
        return len(self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self.now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.now]
        for _, future in due:
            if not future.done():
                future.set_result(None)


HOLD = object()  # a scripted outcome: the ack stays pending until the test decides


class ScriptedConnection:
    """Stands in for a ForwardConnection. Each send takes the next outcome of its script
    (the last one repeats): None, acked at once; an UNREACHABLE or REFUSED error, raised by
    ``send`` (it happens while connecting); another DeliveryError, the ack's future fails
    (the connection broke with the chunk in flight); HOLD, pending until ``break_`` or
    ``ack_all``."""

    def __init__(self, script: list[Any], window: int = 1) -> None:
        self.script = script
        self.window = window
        self.sent: list[int] = []
        self.is_open = False
        self.keepalive = True
        self.generation = 0
        self.acked = 0
        self.closed = 0
        self.pending: list[asyncio.Future[None]] = []

    @property
    def idle_reused(self) -> bool:
        return self.is_open and self.acked > 0 and not self.pending

    async def send(self, chunk: Chunk, *, expect_ack: bool) -> asyncio.Future[None]:
        del expect_ack  # the real signature's; the script decides the outcome
        self.sent.append(seq_of(chunk))
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(outcome, DeliveryError) and outcome.kind is not FailureKind.BROKEN:
            self.is_open = False
            raise outcome
        if not self.is_open:
            self.is_open = True
            self.generation += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if outcome is None:
            future.set_result(None)
            self.acked += 1
        elif outcome is HOLD:
            self.pending.append(future)
        else:
            assert isinstance(outcome, DeliveryError)
            self.break_(outcome)
            future.set_exception(outcome)
        return future

    def break_(self, error: DeliveryError) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.set_exception(error)
        self.is_open = False

    def ack_all(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.set_result(None)
            self.acked += 1

    async def wait_ack(self, future: asyncio.Future[None], _deadline: float) -> None:
        await future

    async def aclose(self) -> None:
        self.closed += 1
        self.is_open = False


def chunk(seq: int) -> Chunk:
    return Chunk.of(ChunkId(f"id-{seq}"), "t", b"payload", 1, seq=seq)


class Rig:
    """A running ForwardOutput whose connections are scripted, with a buffer that keeps a
    stalled chunk first in line, fake time, and heartbeat probes answered by ``probe_ok``.

    A stall advances the fake time past every backoff, so that waiting for a server takes
    no real time."""

    def __init__(self, cfg: OutputConfig, scripts: list[list[Any]], window: int = 1) -> None:
        self.time = FakeTime()
        self.queue: collections.deque[Chunk] = collections.deque()
        self.available = asyncio.Event()
        self.delivered: list[int] = []
        self.stalled: list[int] = []
        self.probes = 0
        self.probe_ok = False
        self.conns = [ScriptedConnection(script, window) for script in scripts]
        unused = iter(self.conns)  # one per server, in the order of cfg.servers
        self.output = ForwardOutput(
            cfg,
            get_chunk=self._get,
            delivered=self._delivered,
            stalled=self._stalled,
            connect=lambda _server: next(unused),
            probe=self._probe,
            clock=self.time.clock,
            sleep=self.time.sleep,
            rng=random.Random(1),
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self._task = asyncio.create_task(self.output.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    def put(self, *seqs: int) -> None:
        self.queue.extend(chunk(s) for s in seqs)
        self.available.set()

    async def _get(self) -> Chunk:
        while not self.queue:
            self.available.clear()
            await self.available.wait()
        return self.queue.popleft()

    async def _delivered(self, c: Chunk) -> None:
        self.delivered.append(seq_of(c))

    async def _stalled(self, c: Chunk) -> None:
        self.stalled.append(seq_of(c))
        self.queue.appendleft(c)
        self.available.set()
        self.time.advance(self.output.cfg.retry_max_wait.total_seconds())

    async def _probe(self, _endpoint: object, _timeout_s: float) -> bool:
        self.probes += 1
        return self.probe_ok

    async def until(self, done: Callable[[], bool], budget: int = 10_000) -> None:
        """Let the output run until ``done()``: at most ``budget`` turns of the loop."""
        for _ in range(budget):
            if done():
                return
            await asyncio.sleep(0)
        raise AssertionError(f"not done: delivered={self.delivered} stalled={self.stalled}")


def test_a_failed_chunk_goes_to_the_next_server_and_is_delivered_once() -> None:
    async def main() -> None:
        scripts: list[list[DeliveryError | None]] = [[ConnectError("refused"), None], [None]]
        async with Rig(output_config("tcp://a:1", "tcp://b:1"), scripts) as rig:
            rig.put(1, 2, 3, 4)
            await rig.until(lambda: len(rig.delivered) == 4)
            assert rig.delivered == [1, 2, 3, 4]
            assert rig.stalled == []
            assert rig.conns[0].sent == [1]
            assert rig.conns[1].sent == [1, 2, 3, 4]  # 1 resent, unchanged
            assert rig.output.servers[0].health.state is ServerState.DOWN

    run(main())


def test_a_kept_alive_connection_that_broke_while_idle_is_retried_once_at_once() -> None:
    async def main() -> None:
        scripts: list[list[DeliveryError | None]] = [[None, ConnectionLostError("reset"), None]]
        async with Rig(output_config("tcp://a:1"), scripts) as rig:
            rig.put(1, 2)
            await rig.until(lambda: len(rig.delivered) == 2)
            assert rig.conns[0].sent == [1, 2, 2]
            assert rig.output.servers[0].health.state is ServerState.UP

    run(main())


def test_with_every_server_down_the_chunk_is_handed_back_once_per_round() -> None:
    async def main() -> None:
        async with Rig(output_config("tcp://a:1"), [[AckTimeoutError("no ack")]]) as rig:
            rig.put(1)
            await rig.until(lambda: len(rig.stalled) >= 3)
            assert rig.delivered == []
            assert rig.stalled[:3] == [1, 1, 1]
            assert rig.conns[0].sent[:3] == [1, 1, 1]  # one attempt per round

    run(main())


def test_a_refusing_server_is_not_hammered_by_heartbeats() -> None:
    async def main() -> None:
        refusal = AuthError("the server refused the handshake: shared key mismatch")
        async with Rig(output_config("tcp://a:1", "tcp://b:1"), [[refusal], [None]]) as rig:
            rig.probe_ok = True
            rig.put(*range(1, 51))
            await rig.until(lambda: len(rig.delivered) == 50)
            for _ in range(20):  # 20 heartbeat intervals: no probe, no attempt
                rig.time.advance(1.0)
                await asyncio.sleep(0)
            assert rig.delivered == list(range(1, 51))
            assert rig.probes == 0
            assert rig.output.servers[0].heartbeat is None
            assert rig.conns[0].sent == [1]

    run(main())


def test_an_unreachable_server_comes_back_on_a_heartbeat_before_its_backoff_ends() -> None:
    async def main() -> None:
        cfg = output_config(
            "tcp://a:1",
            "tcp://b:1",
            heartbeat_interval="1s",
            retry_wait="60s",
            retry_max_wait="60s",
        )
        scripts: list[list[DeliveryError | None]] = [[ConnectError("refused"), None], [None]]
        async with Rig(cfg, scripts) as rig:
            rig.put(1, 2)
            await rig.until(lambda: len(rig.delivered) == 2)
            for expected in (1, 2):  # one TCP probe per heartbeat interval
                await rig.until(lambda: rig.time.sleeping == 1)
                rig.time.advance(1.0)
                await rig.until(lambda: rig.probes == expected)  # noqa: B023
            rig.probe_ok = True
            await rig.until(lambda: rig.time.sleeping == 1)
            rig.time.advance(1.0)
            await rig.until(lambda: rig.probes == 3)
            rig.put(3, 4, 5, 6)
            await rig.until(lambda: len(rig.delivered) == 6)
            assert rig.conns[0].sent == [1, 3, 5]  # back after 3s, not 30-60s
            assert rig.output.servers[0].health.state is ServerState.UP
            assert rig.output.servers[0].heartbeat is not None
            assert rig.output.servers[0].heartbeat.done()

    run(main())


def test_no_task_outlives_the_output() -> None:
    async def main() -> None:
        scripts: list[list[DeliveryError | None]] = [[ConnectError("refused")]] * 2
        async with Rig(output_config("tcp://a:1", "tcp://b:1"), scripts) as rig:
            rig.put(1)
            await rig.until(lambda: bool(rig.stalled))
            assert all(s.heartbeat is not None for s in rig.output.servers)
        assert all(s.heartbeat is None for s in rig.output.servers)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        assert not others, others

    run(main())


def test_standby_takes_over_and_hands_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "forwarder.forward.client")

    async def main() -> None:
        cfg = output_config("tcp://a:1", {"url": "tcp://s:1", "standby": True})
        scripts: list[list[DeliveryError | None]] = [[None, None, ConnectError("refused")], [None]]
        async with Rig(cfg, scripts) as rig:
            rig.put(1, 2)
            await rig.until(lambda: len(rig.delivered) == 2)
            assert rig.conns[1].sent == []  # idle while the primary is up
            rig.put(3, 4, 5)
            await rig.until(lambda: len(rig.delivered) == 5)
            assert rig.conns[1].sent == [3, 4, 5]
            rig.conns[0].script = [None]
            rig.time.advance(5.0)  # the primary's backoff ends
            rig.put(6, 7)
            await rig.until(lambda: len(rig.delivered) == 7)
            assert rig.conns[1].sent == [3, 4, 5]
            assert rig.conns[0].sent[-2:] == [6, 7]

    run(main())
    assert "standby tcp://s:1 takes the chunks" in caplog.text
    assert "primary server tcp://a:1 is up" in caplog.text


def test_a_failure_is_logged_once_until_the_reason_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "forwarder.forward.client")

    async def main() -> None:
        refused = AuthError("the server refused the handshake: x")
        scripts: list[list[DeliveryError | None]] = [[ConnectError("refused")] * 3 + [refused]]
        async with Rig(output_config("tcp://a:1"), scripts) as rig:
            rig.put(1)
            await rig.until(lambda: len(rig.stalled) >= 6)

    run(main())
    failures = [r for r in caplog.records if "marked down" in r.getMessage()]
    assert [r.levelname for r in failures] == ["WARNING", "ERROR"]
    assert "refused; marked down" in failures[0].getMessage()
    assert "handshake: x; marked down" in failures[1].getMessage()
    stalls = [r for r in caplog.records if "no server can take chunks" in r.getMessage()]
    assert len(stalls) == 1


def test_up_to_a_window_of_chunks_await_their_acks_on_one_connection() -> None:
    async def main() -> None:
        async with Rig(output_config("tcp://a:1"), [[HOLD]], window=3) as rig:
            rig.put(1, 2, 3, 4, 5)
            await rig.until(lambda: len(rig.conns[0].sent) == 3)
            for _ in range(50):  # the window is full: nothing more is sent
                await asyncio.sleep(0)
            assert rig.conns[0].sent == [1, 2, 3]
            rig.conns[0].ack_all()
            await rig.until(lambda: len(rig.conns[0].sent) == 5)
            rig.conns[0].ack_all()
            await rig.until(lambda: len(rig.delivered) == 5)
            # (acks that come together may be handled in any order: the position tracker
            # commits in sealing order anyway)
            assert sorted(rig.delivered) == [1, 2, 3, 4, 5]

    run(main())


def test_a_connection_that_breaks_with_chunks_in_flight_is_one_failure_and_they_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "forwarder.forward.client")

    async def main() -> None:
        cfg = output_config({"url": "tcp://a:1", "weight": 100}, {"url": "tcp://b:1", "weight": 1})
        async with Rig(cfg, [[HOLD], [None]], window=3) as rig:
            rig.put(1, 2, 3)
            await rig.until(lambda: len(rig.conns[0].sent) == 3)
            rig.conns[0].break_(ConnectionLostError("reset"))
            await rig.until(lambda: len(rig.delivered) == 3)
            assert rig.conns[1].sent == [1, 2, 3]  # resent in order
            assert sorted(rig.delivered) == [1, 2, 3]
            assert rig.stalled == []

    run(main())
    downs = [r for r in caplog.records if "marked down" in r.getMessage()]
    assert len(downs) == 1


def test_with_no_server_left_every_held_chunk_goes_back_newest_first() -> None:
    async def main() -> None:
        scripts: list[list[Any]] = [[HOLD, HOLD, HOLD, ConnectError("refused")]]
        async with Rig(output_config("tcp://a:1"), scripts, window=3) as rig:
            rig.put(1, 2, 3, 4)
            await rig.until(lambda: len(rig.conns[0].sent) == 3)
            rig.conns[0].break_(AckTimeoutError("no ack"))
            await rig.until(lambda: len(rig.stalled) >= 4)
            assert rig.stalled[:4] == [4, 3, 2, 1]  # so the buffer has them as 1 2 3 4
            assert rig.delivered == []

    run(main())


def test_cancelling_the_output_hands_back_what_it_holds_newest_first() -> None:
    async def main() -> None:
        rig = Rig(output_config("tcp://a:1"), [[HOLD]], window=3)
        async with rig:
            rig.put(1, 2, 3, 4, 5)
            await rig.until(lambda: len(rig.conns[0].sent) == 3)
            await asyncio.sleep(0)
        # 1-3 in flight, 4 waiting for room; 5 still in the buffer (never taken)
        assert rig.stalled == [4, 3, 2, 1]
        assert [c.seq for c in rig.queue] == [1, 2, 3, 4, 5]
        assert rig.delivered == []

    run(main())


def test_an_error_in_delivered_stops_the_output() -> None:
    async def main() -> None:
        rig = Rig(output_config("tcp://a:1"), [[None]])

        async def broken(_chunk: Chunk) -> None:
            raise RuntimeError("downstream bug")

        rig.output._delivered = broken
        rig.put(1, 2)
        with pytest.raises(RuntimeError, match="downstream bug"):
            async with asyncio.timeout(5):
                await rig.output.run()

    run(main())


def test_connections_are_closed_when_the_output_stops() -> None:
    async def main() -> None:
        async with Rig(output_config("tcp://a:1", "tcp://b:1"), [[None], [None]]) as rig:
            rig.put(1, 2)
            await rig.until(lambda: len(rig.delivered) == 2)
        assert [c.closed for c in rig.conns] == [1, 1]

    run(main())


def test_server_config_keeps_its_url() -> None:
    cfg = output_config({"url": "tls://agg:24284", "weight": 5, "standby": True})
    assert cfg.servers == [ServerConfig(url="tls://agg:24284", weight=5, standby=True)]


# --- the connection state machine: a HELO nobody asked for ---------------------------------


@pytest.mark.parametrize("awaiting_ack", [False, True])
def test_a_helo_on_a_connection_without_handshake_names_the_missing_shared_key(
    awaiting_ack: bool,
) -> None:
    import msgpack

    from forwarder.forward.protocol import ClientConnection, HandshakeRequiredError

    conn: ClientConnection[None] = ClientConnection()
    if awaiting_ack:
        conn.send_chunk(chunk(1), expect_ack=True)
    conn.receive_data(msgpack.packb(["HELO", {"nonce": b"n", "auth": "", "keepalive": True}]))
    with pytest.raises(HandshakeRequiredError, match=r"HELO\), but \[output\] shared_key is not"):
        conn.next_event()
