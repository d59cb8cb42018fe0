"""ForwardOutput over real sockets to our test receiver, in-process, on both event loops
(asyncio and uvloop, which ``forwarder run`` uses): the handshake, TLS, kept-alive
connections, failover, weights and standbys.

The receivers run in threads; every wait is bounded (``Feeder.wait``, the receivers'
``wait_for``), nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from forwarder.chunks import Chunk, new_chunk_id
from forwarder.config import OutputConfig, config_from_dict
from forwarder.forward.output import ForwardOutput
from forwarder.forward.protocol import encode_entries, encode_message
from forwarder.forward.setup import handshake_factory
from tests import helpers
from tests.harness.certs import PKI, make_pki, openssl_available
from tests.harness.receivers import ForwardReceiver, server_tls_context

DEADLINE_S = 20.0
SECRET = "s3cret-Shared-Key-0123"
PASSWORD = "pa55-Word-xyz"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        helpers.run(
            coro, loop="uvloop" if loop_kind == "uvloop" else "asyncio", deadline_s=DEADLINE_S
        )

    return runner


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if not openssl_available():
        pytest.skip("needs the openssl CLI")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def receivers(
    make_forward_receiver: Callable[..., ForwardReceiver],
) -> Callable[..., ForwardReceiver]:
    """Started ForwardReceivers, stopped after the test (the conftest fixture)."""
    return make_forward_receiver


def output_config(servers: list[Any], **output: Any) -> OutputConfig:
    base: dict[str, Any] = {
        "servers": servers,
        "retry_wait": "50ms",
        "retry_max_wait": "200ms",
        "heartbeat_interval": "50ms",
        "connect_timeout": "2s",
        "ack_timeout": "2s",
    }
    return config_from_dict({"output": {**base, **output}}, env={}).output


_seq = iter(range(1, 1 << 30))


def make_chunk(n: int) -> Chunk:
    chunk_id = new_chunk_id()
    entries = encode_entries([(time.time_ns(), {"n": n})])
    payload = encode_message("test", entries, 1, chunk_id=chunk_id)
    return Chunk.of(chunk_id, "test", payload, 1, seq=next(_seq))


class Feeder:
    """The buffer's side for a ForwardOutput: numbered one-record chunks in; ``delivered``
    and ``stalled`` recorded; a stalled chunk goes back first in line."""

    def __init__(self) -> None:
        self.queue: collections.deque[Chunk] = collections.deque()
        self.numbers: dict[int | None, int] = {}  # chunk seq -> record number
        self.available = asyncio.Event()
        self.changed = asyncio.Event()
        self.delivered: list[int] = []
        self.stalls = 0

    def put(self, numbers: range | list[int]) -> None:
        for n in numbers:
            chunk = make_chunk(n)
            self.numbers[chunk.seq] = n
            self.queue.append(chunk)
        self.available.set()

    async def get(self) -> Chunk:
        while not self.queue:
            self.available.clear()
            await self.available.wait()
        return self.queue.popleft()

    async def on_delivered(self, chunk: Chunk) -> None:
        self.delivered.append(self.numbers[chunk.seq])
        self.changed.set()

    async def on_stalled(self, chunk: Chunk) -> None:
        self.stalls += 1
        self.queue.appendleft(chunk)
        self.available.set()
        self.changed.set()

    async def wait(self, done: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
        try:
            async with asyncio.timeout(within_s):
                while not done():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for {what}: delivered {len(self.delivered)}, "
                f"stalls {self.stalls}"
            ) from None


@contextlib.asynccontextmanager
async def running(cfg: OutputConfig, feeder: Feeder) -> AsyncIterator[ForwardOutput]:
    output = ForwardOutput(
        cfg,
        get_chunk=feeder.get,
        delivered=feeder.on_delivered,
        stalled=feeder.on_stalled,
        handshake_factory=handshake_factory(cfg),
    )
    task = asyncio.create_task(output.run())
    try:
        yield output
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert asyncio.all_tasks() == {asyncio.current_task()}, "a task outlived the output"


def numbers_at(receiver: ForwardReceiver) -> list[int]:
    return [r["record"]["n"] for r in receiver.records]


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


# --- kept-alive connections ---------------------------------------------------------------


def test_one_connection_carries_every_chunk(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver]
) -> None:
    receiver = receivers()

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([receiver.address]), feeder):
            feeder.put(range(200))
            await feeder.wait(lambda: len(feeder.delivered) == 200, "200 chunks")

    run(main())
    assert numbers_at(receiver) == list(range(200))
    assert receiver.connections_total == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_failure(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "forwarder.forward.client")
    receiver = receivers()

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([receiver.address]), feeder) as output:
            feeder.put([1])
            await feeder.wait(lambda: len(feeder.delivered) == 1, "chunk 1")
            await in_thread(receiver.stop)  # closes our idle connection
            await in_thread(receiver.start)
            feeder.put([2])
            await feeder.wait(lambda: len(feeder.delivered) == 2, "chunk 2")
            assert output.servers[0].connection.generation == 2

    run(main())
    assert numbers_at(receiver) == [1, 2]
    assert "marked down" not in caplog.text


# --- the handshake ------------------------------------------------------------------------


def test_handshake_with_shared_key_and_user_delivers(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver]
) -> None:
    receiver = receivers(shared_key=SECRET, users={"fluent": PASSWORD})

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config(
            [receiver.address], shared_key=SECRET, username="fluent", password=PASSWORD
        )
        async with running(cfg, feeder):
            feeder.put(range(20))
            await feeder.wait(lambda: len(feeder.delivered) == 20, "20 chunks")

    run(main())
    assert numbers_at(receiver) == list(range(20))
    assert receiver.connections_total == 1  # one handshake, then every chunk
    assert receiver.auth_failures == []


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ({"shared_key": "wrong-key-4567"}, "shared_key mismatch"),
        (
            {"shared_key": SECRET, "username": "fluent", "password": "wrong-pw-89"},
            "username/password mismatch",
        ),
    ],
)
def test_a_refused_handshake_delivers_nothing_and_logs_the_reason_not_the_secret(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    caplog: pytest.LogCaptureFixture,
    output: dict[str, str],
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver = receivers(shared_key=SECRET, users={"fluent": PASSWORD})

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([receiver.address], **output), feeder):
            feeder.put([1])
            await feeder.wait(lambda: feeder.stalls >= 3, "three refused rounds")

    run(main())
    assert receiver.records == []
    assert receiver.messages_received == 0
    assert receiver.auth_failures[0] == reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"server {receiver.address}: the server refused the handshake: {reason}; marked down, "
        + errors[0].split("; marked down, ", 1)[1]
    ]
    for secret in (SECRET, PASSWORD, *output.values()):
        if secret not in ("fluent",):
            assert secret not in caplog.text


def test_a_bad_pong_digest_drops_the_connection_before_any_data(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = receivers(shared_key=SECRET, bad_pong_digest=True)

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([receiver.address], shared_key=SECRET), feeder):
            feeder.put([1])
            await feeder.wait(lambda: feeder.stalls >= 2, "two rounds")

    run(main())
    assert receiver.messages_received == 0
    assert receiver.errors == []  # it saw our PING and then a close, never a chunk
    assert "handshake failed, connection dropped: shared key mismatch: the server's PONG " in (
        caplog.text
    )
    assert SECRET not in caplog.text


def test_a_server_asking_for_a_handshake_we_have_no_key_for_says_so(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = receivers(shared_key=SECRET)

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([receiver.address]), feeder):
            feeder.put([1])
            await feeder.wait(lambda: feeder.stalls >= 1, "a refused round")

    run(main())
    assert receiver.records == []
    assert "the server asks for the handshake (HELO), but [output] shared_key is not set" in (
        caplog.text
    )


def test_a_shared_key_for_a_server_without_security_says_so(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = receivers()

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config([receiver.address], shared_key=SECRET, connect_timeout="300ms")
        async with running(cfg, feeder):
            feeder.put([1])
            await feeder.wait(lambda: feeder.stalls >= 1, "a refused round")

    run(main())
    assert receiver.records == []
    assert (
        "the server sent no HELO within 0.3s: [output] shared_key is set, but the server "
        "does not ask for the handshake" in caplog.text
    )


# --- TLS ----------------------------------------------------------------------------------


def tls_url(receiver: ForwardReceiver, host: str = "localhost") -> str:
    return f"tls://{host}:{receiver.port}"


def test_verified_tls_with_handshake_delivers(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver], pki: PKI
) -> None:
    receiver = receivers(tls=server_tls_context(pki.server.cert, pki.server.key), shared_key=SECRET)

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config(
            [tls_url(receiver)], shared_key=SECRET, tls={"ca_file": str(pki.ca.cert)}
        )
        async with running(cfg, feeder):
            feeder.put(range(30))
            await feeder.wait(lambda: len(feeder.delivered) == 30, "30 chunks")

    run(main())
    assert numbers_at(receiver) == list(range(30))
    assert receiver.connections_total == 1


def test_mutual_tls_delivers(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver], pki: PKI
) -> None:
    import ssl

    context = server_tls_context(pki.server.cert, pki.server.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=pki.ca.cert)
    receiver = receivers(tls=context)

    async def main() -> None:
        feeder = Feeder()
        tls = {
            "ca_file": str(pki.ca.cert),
            "cert_file": str(pki.client.cert),
            "key_file": str(pki.client.key),
        }
        async with running(output_config([tls_url(receiver, "127.0.0.1")], tls=tls), feeder):
            feeder.put(range(5))
            await feeder.wait(lambda: len(feeder.delivered) == 5, "5 chunks")

    run(main())
    assert numbers_at(receiver) == list(range(5))


def test_an_untrusted_certificate_is_refused_and_the_log_says_why(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = receivers(tls=server_tls_context(pki.other_server.cert, pki.other_server.key))

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config([tls_url(receiver)], tls={"ca_file": str(pki.ca.cert)})
        async with running(cfg, feeder):
            feeder.put([1])
            await feeder.wait(lambda: feeder.stalls >= 2, "two refused rounds")

    run(main())
    assert receiver.records == []
    assert (
        "TLS handshake failed: certificate verify failed: unable to get local issuer "
        "certificate (the server's certificate is not signed by a trusted CA)" in caplog.text
    )


def test_tls_to_a_plain_port_is_named(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = receivers()

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config([tls_url(receiver)], tls={"ca_file": str(pki.ca.cert)})
        async with running(cfg, feeder):
            feeder.put([1])
            await feeder.wait(lambda: feeder.stalls >= 1, "a refused round")

    run(main())
    assert "TLS handshake failed: " in caplog.text


def test_verify_false_warns_once_and_delivers(
    run: Callable[..., None],
    receivers: Callable[..., ForwardReceiver],
    pki: PKI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = receivers(tls=server_tls_context(pki.other_server.cert, pki.other_server.key))

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config([tls_url(receiver, "127.0.0.1")], tls={"verify": False})
        async with running(cfg, feeder):
            feeder.put(range(10))
            await feeder.wait(lambda: len(feeder.delivered) == 10, "10 chunks")

    run(main())
    warnings = [r for r in caplog.records if "verify = false" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


# --- several servers ----------------------------------------------------------------------


def test_weights_3_to_1_share_400_chunks_3_to_1(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver]
) -> None:
    heavy, light = receivers(), receivers()

    async def main() -> None:
        feeder = Feeder()
        servers = [{"url": heavy.address, "weight": 3}, {"url": light.address, "weight": 1}]
        async with running(output_config(servers), feeder):
            feeder.put(range(400))
            await feeder.wait(lambda: len(feeder.delivered) == 400, "400 chunks")

    run(main())
    ratio = len(heavy.records) / len(light.records)
    assert 2.7 <= ratio <= 3.3, (len(heavy.records), len(light.records))
    assert sorted(numbers_at(heavy) + numbers_at(light)) == list(range(400))
    assert heavy.connections_total == light.connections_total == 1


def test_standby_is_idle_while_a_primary_is_up_and_takes_over_when_none_is(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver]
) -> None:
    first, second, standby = receivers(), receivers(), receivers()

    async def main() -> None:
        feeder = Feeder()
        servers = [first.address, second.address, {"url": standby.address, "standby": True}]
        async with running(output_config(servers), feeder) as output:
            feeder.put(range(100))
            await feeder.wait(lambda: len(feeder.delivered) == 100, "100 chunks")
            assert standby.connections_total == 0
            await in_thread(first.stop)
            feeder.put(range(100, 150))
            await feeder.wait(lambda: len(feeder.delivered) == 150, "150 chunks")
            assert standby.records == []
            await in_thread(second.stop)
            feeder.put(range(150, 200))
            await feeder.wait(lambda: len(feeder.delivered) == 200, "200 chunks")
            assert numbers_at(standby) == list(range(150, 200))
            await in_thread(first.start)
            # the heartbeat (a TCP connect every 50ms) finds it back
            await helpers.until(
                lambda: output.servers[0].health.eligible(time.monotonic()),
                what="the server to be eligible again",
            )
            feeder.put(range(200, 300))
            await feeder.wait(lambda: len(feeder.delivered) == 300, "300 chunks")

    run(main())
    everything = numbers_at(first) + numbers_at(second) + numbers_at(standby)
    assert sorted(set(everything)) == list(range(300))
    # back on the primary: at most the chunk that found it back goes to the standby
    assert len([n for n in numbers_at(standby) if n >= 200]) <= 1


def test_a_server_killed_mid_stream_loses_nothing_and_comes_back(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver]
) -> None:
    first, second = receivers(), receivers()
    total = 3000

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([first.address, second.address]), feeder):
            feeder.put(range(total))
            await feeder.wait(lambda: len(feeder.delivered) >= 300, "300 chunks")
            await in_thread(first.stop)
            stopped_at = len(feeder.delivered)
            await feeder.wait(lambda: len(feeder.delivered) >= stopped_at + 300, "failover")
            await in_thread(first.start)
            await feeder.wait(lambda: len(feeder.delivered) == total, "all chunks", within_s=30)
            assert sorted(feeder.delivered) == list(range(total))

    run(main())
    received = numbers_at(first) + numbers_at(second)
    assert set(received) == set(range(total))
    duplicates = len(received) - total
    assert duplicates <= 1, duplicates  # only the chunk in flight when it was killed
    # both took chunks after the first came back
    assert any(r["conn"] >= 2 for r in first.records)


@pytest.mark.parametrize(
    "knobs",
    [
        {"ack": False},
        {"garbage": True},
        {"close_after_n_chunks": 3},
    ],
    ids=["no-ack", "garbage", "reset"],
)
def test_a_chunk_the_server_fails_is_resent_to_another(
    run: Callable[..., None], receivers: Callable[..., ForwardReceiver], knobs: dict[str, Any]
) -> None:
    bad, good = receivers(**knobs), receivers()

    async def main() -> None:
        feeder = Feeder()
        cfg = output_config([bad.address, good.address], ack_timeout="300ms")
        async with running(cfg, feeder):
            feeder.put(range(20))
            await feeder.wait(lambda: len(feeder.delivered) == 20, "20 chunks")

    run(main())
    if bad.acks_sent:  # reset: the first chunks of each connection were acked there
        assert set(numbers_at(bad)) | set(numbers_at(good)) == set(range(20))
    else:  # never acked there: every chunk went to the good one as well
        assert set(numbers_at(good)) == set(range(20))


def test_secrets_from_a_file_and_from_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    cfg = config_from_dict(
        {
            "output": {
                "shared_key_file": str(key_file),
                "username": "fluent",
                "password": "${FWD_PASSWORD}",
            }
        },
        env={"FWD_PASSWORD": PASSWORD},
    ).output
    factory = handshake_factory(cfg)
    assert factory is not None
    assert SECRET not in repr(factory())
    assert PASSWORD not in repr(factory())
    assert cfg.secret_shared_key() == SECRET
    assert cfg.secret_password() == PASSWORD


def test_a_server_that_says_keepalive_false_gets_a_connection_per_chunk(
    run: Callable[..., None],
) -> None:
    """A minimal server made of the handshake module's server side: HELO with keepalive
    false, then it acks and waits. The client must close after each ack itself."""
    import msgpack

    from forwarder.forward.handshake import check_ping, make_helo, make_pong

    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        unpacker = msgpack.Unpacker(raw=False)
        writer.write(make_helo(b"nonce-123", b"", keepalive=False))

        async def next_message() -> Any:
            while True:
                for message in unpacker:
                    return message
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError
                unpacker.feed(data)

        try:
            verdict = check_ping(await next_message(), b"nonce-123", b"", SECRET, {})
            writer.write(make_pong(True, "", "srv", verdict.shared_key_salt, b"nonce-123", SECRET))
            message = await next_message()
            writer.write(msgpack.packb({"ack": message[2]["chunk"]}))
            await reader.read()  # until the client closes
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        feeder = Feeder()
        async with running(output_config([f"tcp://127.0.0.1:{port}"], shared_key=SECRET), feeder):
            feeder.put(range(5))
            await feeder.wait(lambda: len(feeder.delivered) == 5, "5 chunks")
        server.close()
        await server.wait_closed()
        assert connections == 5

    run(main())


def test_forwarder_check_reads_the_secret_and_tls_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from forwarder.cli import main

    missing = tmp_path / "missing"
    cases: list[tuple[dict[str, object], dict[str, object], str]] = [
        ({"shared_key_file": str(missing)}, {}, "output.shared_key_file: can't read"),
        ({"shared_key": "k", "username": "u", "password_file": str(missing)}, {}, "password_file"),
        (
            {"servers": ["tls://agg:24284"]},
            {"ca_file": str(missing)},
            "output.tls.ca_file: can't read",
        ),
    ]
    for output, tls, words in cases:
        config = tmp_path / "forwarder.toml"
        lines = ["[output]"] + [f"{k} = {json_value(v)}" for k, v in output.items()]
        lines += ["[output.tls]"] + [f"{k} = {json_value(v)}" for k, v in tls.items()]
        config.write_text("\n".join(lines) + "\n")
        assert main(["check", "--config", str(config)]) == 2, words
        assert words in capsys.readouterr().err


def json_value(value: Any) -> str:
    import json

    return json.dumps(value)


def test_a_server_that_closes_instead_of_a_pong_is_a_refusal(
    run: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """Fluent Bit's in_forward answers a wrong shared key by closing the connection, with no
    PONG: that is a refusal (retried with backoff, no heartbeat), and the log says so."""
    from forwarder.forward.handshake import make_helo

    pings = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        writer.write(make_helo(b"nonce-123", b""))
        if await reader.read(65536):
            pings += 1
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        feeder = Feeder()
        async with running(output_config([f"tcp://127.0.0.1:{port}"], shared_key=SECRET), feeder):
            feeder.put([1])
            await helpers.until(lambda: pings >= 2, what="a second probe")  # refused, then retried
        server.close()
        await server.wait_closed()

    run(main())
    assert feeder_stalls_seen(caplog)
    refusals = [r for r in caplog.records if "marked down" in r.getMessage()]
    assert refusals[0].levelno == logging.ERROR
    assert "instead of answering our PING: it refused the handshake" in refusals[0].getMessage()


def feeder_stalls_seen(caplog: pytest.LogCaptureFixture) -> bool:
    return "no server can take chunks" in caplog.text


def test_pipelined_chunks_reach_fluent_server_in_order_over_one_handshake(
    run: Callable[..., None], make_node_receiver: Callable[..., Any]
) -> None:
    node = make_node_receiver(
        security={"serverHostname": "fluent-server", "sharedKey": SECRET, "userDict": {}}
    )

    async def main() -> None:
        feeder = Feeder()
        async with running(output_config([node.address], shared_key=SECRET), feeder):
            feeder.put(range(300))
            await feeder.wait(lambda: len(feeder.delivered) == 300, "300 chunks")

    run(main())
    records = node.wait_for(300)
    assert [r["record"]["n"] for r in records] == list(range(300))
    assert node.auth_failures == []


def test_a_connection_shows_its_state_and_its_chunks_awaiting_acks(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    from forwarder.config import parse_server_url
    from forwarder.forward.connection import ForwardConnection

    async def main() -> None:
        received = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                received.set()  # reads every chunk and never acks one
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint = parse_server_url(f"tcp://127.0.0.1:{port}")
        conn = ForwardConnection(endpoint, connect_timeout_s=5, ack_timeout_s=5)
        assert repr(conn) == f"<ForwardConnection tcp://127.0.0.1:{port} CLOSED chunks=0>"
        chunks = [make_chunk(i) for i in range(4)]
        for c in chunks:
            await conn.send(c, expect_ack=True)
        await received.wait()
        assert repr(conn) == f"<ForwardConnection tcp://127.0.0.1:{port} AWAITING_ACK chunks=4>"
        await conn.aclose()
        assert repr(conn) == f"<ForwardConnection tcp://127.0.0.1:{port} CLOSED chunks=0>"
        server.close()
        await server.wait_closed()

    run(main())
