"""Secure and highly available output, end to end: `forwarder run` as a process, a real
engine, and real receivers: Fluent's own FluentServer (``@fluent-org/logger``) with its
``security`` (shared key, users) and TLS options, and our ForwardReceiver for the faults
FluentServer can't make (a wrong PONG digest, a server killed mid-stream).

Secrets are given the ways users give them: ``${ENV}`` in the config, and *_file.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import PKI, make_pki, openssl_available
from tests.harness.collector import CollectorProcess, collector_env, write_config
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver, NodeReceiver

SHARED_KEY = "e2e-Shared-Key-7f3a9c"
PASSWORD = "e2e-Password-51bd"
WRONG_KEY = "e2e-Wrong-Key-0000"
WRONG_PASSWORD = "e2e-Wrong-Password-1111"
SECRETS = (SHARED_KEY, PASSWORD, WRONG_KEY, WRONG_PASSWORD)
NODE_SECURITY = {
    "serverHostname": "fluent-server",
    "sharedKey": SHARED_KEY,
    "authorize": True,
    "userDict": {"fluent": PASSWORD},
}

MakeCollector = Callable[..., CollectorProcess]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if not openssl_available():
        pytest.fail("needs the openssl CLI", pytrace=False)
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def make_collector(engine: Engine, tmp_path: Path) -> Iterator[MakeCollector]:
    """``make_collector(servers, env={...}, **output_keys)``; ``tls={...}`` is [output.tls]."""
    made: list[CollectorProcess] = []

    def make(
        servers: list[Any], env: dict[str, str] | None = None, **output: Any
    ) -> CollectorProcess:
        tls = output.pop("tls", None)
        config: dict[str, dict[str, Any]] = {
            "docker": {"host": engine.host, "read_from": "head"},
            "output": {
                "servers": servers,
                "flush_interval": "200ms",
                "retry_wait": "100ms",
                "retry_max_wait": "500ms",
                "heartbeat_interval": "100ms",
                "connect_timeout": "3s",
                "ack_timeout": "5s",
                "self_hostname": "forwarder-e2e",
                **output,
            },
            "state": {"dir": str(tmp_path / "state")},
            "stats": {"interval": "0s"},
            # tests that refuse every chunk need not wait 10s for them at the end
            "service": {"shutdown_timeout": "1s"},
        }
        if tls is not None:
            config["output.tls"] = tls
        path = write_config(tmp_path / f"forwarder-{len(made)}.toml", config)
        collector = CollectorProcess(path, {**collector_env(engine.env), **(env or {})}, tmp_path)
        made.append(collector)
        return collector.start()

    yield make
    for collector in made:
        collector.stop()


def logs_of(records: list[Any], cid: str) -> list[str]:
    """The log lines of one container (lifecycle records carry no "log")."""
    return [
        r["record"]["log"]
        for r in records
        if r["record"].get("container_id") == cid and "log" in r["record"]
    ]


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a secret is in the collector's log"


def wait_for_log(collector: CollectorProcess, text: str, count: int = 1) -> None:
    wait_until(
        lambda: collector.log().count(text) >= count or not collector.running(),
        timeout=30,
        what=lambda: f"{text!r} in the log:\n{collector.log()[-3000:]}",
    )
    assert collector.running(), collector.log()


def secret_files(tmp_path: Path) -> Path:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    return password_file


# --- the handshake, against FluentServer ----------------------------------------------------


def test_fluent_server_with_shared_key_and_user_delivers(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
    tmp_path: Path,
) -> None:
    node = make_node_receiver(security=NODE_SECURITY)
    cid = engine.run("sh", "-c", "seq 1 300; sleep 600", name="secured")
    collector = make_collector(
        [node.address],
        env={"FWD_SHARED_KEY": SHARED_KEY},
        shared_key="${FWD_SHARED_KEY}",
        username="fluent",
        password_file=str(secret_files(tmp_path)),
    )
    records = node.wait_for(lambda rs: len(logs_of(rs, cid)) >= 300, timeout=30)
    assert logs_of(records, cid) == [str(i) for i in range(1, 301)]
    assert node.auth_failures == []
    assert_no_secret(collector.log())


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ({"shared_key": WRONG_KEY}, "shared key mismatch"),
        (
            {"shared_key": SHARED_KEY, "username": "fluent", "password": WRONG_PASSWORD},
            "username/password mismatch",
        ),
        ({"shared_key": SHARED_KEY, "username": "nobody", "password": PASSWORD}, None),
    ],
    ids=["wrong-key", "wrong-password", "unknown-user"],
)
def test_fluent_server_refuses_wrong_credentials_and_nothing_is_delivered(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
    output: dict[str, str],
    reason: str | None,
) -> None:
    node = make_node_receiver(security=NODE_SECURITY)
    engine.run("sh", "-c", "seq 1 50; sleep 600")
    collector = make_collector([node.address], **output)
    # refused, then refused again after a backoff: the retries go on, quietly
    node.wait_for_condition(lambda: len(node.auth_failures) >= 3, timeout=30)
    expected = reason or node.auth_failures[0]
    wait_for_log(collector, f"the server refused the handshake: {expected}")
    assert node.records == []
    log = collector.log()
    assert log.count("the server refused the handshake") == 1, "logged once, not per retry"
    assert "ERROR" in log.split("the server refused the handshake")[0].rsplit("\n", 1)[-1]
    assert_no_secret(log)


def test_shared_key_for_fluent_server_without_security_is_named(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
) -> None:
    node = make_node_receiver()
    engine.run("sh", "-c", "seq 1 5; sleep 600")
    collector = make_collector([node.address], shared_key=SHARED_KEY, connect_timeout="500ms")
    wait_for_log(collector, "the server sent no HELO within 0.5s: [output] shared_key is set")
    assert node.records == []
    assert_no_secret(collector.log())


def test_fluent_server_with_security_but_no_shared_key_is_named(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
) -> None:
    node = make_node_receiver(security=NODE_SECURITY)
    engine.run("sh", "-c", "seq 1 5; sleep 600")
    collector = make_collector([node.address])
    wait_for_log(
        collector, "the server asks for the handshake (HELO), but [output] shared_key is not set"
    )
    assert node.records == []


# --- the handshake, against our receiver's faults ---------------------------------------------


def test_a_bad_pong_digest_drops_the_connection_and_nothing_is_sent(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
) -> None:
    receiver = make_forward_receiver(shared_key=SHARED_KEY, bad_pong_digest=True)
    engine.run("sh", "-c", "seq 1 50; sleep 600")
    collector = make_collector([receiver.address], shared_key=SHARED_KEY)
    wait_for_log(collector, "the server's PONG digest is not the one our shared key gives")
    wait_until(lambda: receiver.connections_total >= 3, timeout=30, what="retries")
    assert receiver.messages_received == 0
    assert receiver.records == []
    assert "handshake failed, connection dropped" in collector.log()
    assert_no_secret(collector.log())


# --- TLS, against FluentServer --------------------------------------------------------------


def test_verified_tls_with_the_handshake_delivers(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
    pki: PKI,
    tmp_path: Path,
) -> None:
    node = make_node_receiver(
        security=NODE_SECURITY, tls={"key": pki.server.key, "cert": pki.server.cert}
    )
    cid = engine.run("sh", "-c", "seq 1 300; sleep 600")
    key_file = tmp_path / "shared_key"
    key_file.write_text(SHARED_KEY + "\n")
    collector = make_collector(
        [f"tls://localhost:{node.port}"],
        shared_key_file=str(key_file),
        username="fluent",
        password="${FWD_PASSWORD}",
        env={"FWD_PASSWORD": PASSWORD},
        tls={"ca_file": str(pki.ca.cert)},
    )
    records = node.wait_for(lambda rs: len(logs_of(rs, cid)) >= 300, timeout=30)
    assert logs_of(records, cid) == [str(i) for i in range(1, 301)]
    assert "verify = false" not in collector.log()
    assert_no_secret(collector.log())


def test_a_certificate_from_another_ca_is_refused_and_named(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
    pki: PKI,
) -> None:
    node = make_node_receiver(tls={"key": pki.other_server.key, "cert": pki.other_server.cert})
    engine.run("sh", "-c", "seq 1 50; sleep 600")
    collector = make_collector([f"tls://localhost:{node.port}"], tls={"ca_file": str(pki.ca.cert)})
    wait_for_log(
        collector,
        "TLS handshake failed: certificate verify failed: unable to get local issuer "
        "certificate (the server's certificate is not signed by a trusted CA)",
    )
    assert node.records == []


def test_mutual_tls_and_verify_false_warn_once(
    engine: Engine,
    make_node_receiver: Callable[..., NodeReceiver],
    make_collector: MakeCollector,
    pki: PKI,
) -> None:
    node = make_node_receiver(
        tls={
            "key": pki.other_server.key,
            "cert": pki.other_server.cert,
            "ca": pki.ca.cert,
            "requestCert": True,
        }
    )
    cid = engine.run("sh", "-c", "seq 1 100; sleep 600")
    collector = make_collector(
        [f"tls://127.0.0.1:{node.port}"],
        tls={"verify": False, "cert_file": str(pki.client.cert), "key_file": str(pki.client.key)},
    )
    node.wait_for(lambda rs: len(logs_of(rs, cid)) >= 100, timeout=30)
    assert collector.log().count("[output.tls] verify = false") == 1


# --- several servers ------------------------------------------------------------------------


def test_a_server_killed_mid_stream_loses_no_line(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
) -> None:
    first, second = make_forward_receiver(), make_forward_receiver()
    batches, per_batch = 60, 100
    total = batches * per_batch
    script = (
        f"b=0; while [ $b -lt {batches} ]; do "
        f"seq $((b*{per_batch}+1)) $((b*{per_batch}+{per_batch})); b=$((b+1)); sleep 0.1; "
        "done; sleep 600"
    )
    collector = make_collector([first.address, second.address])
    cid = engine.run("sh", "-c", script)
    first.wait_for(lambda rs: len(logs_of(rs, cid)) >= 500, timeout=30)
    first.stop()  # killed mid-stream: its connections are closed, its port refuses
    at_stop = len(logs_of(second.records, cid))
    second.wait_for(lambda rs: len(logs_of(rs, cid)) >= at_stop + 500, timeout=30)
    first.start()  # back on the same port: the heartbeat finds it
    wait_until(
        lambda: len(set(logs_of(first.records, cid) + logs_of(second.records, cid))) >= total,
        timeout=60,
        what="every line at one receiver or the other",
    )
    received = logs_of(first.records, cid) + logs_of(second.records, cid)
    counts = collections.Counter(received)
    assert set(counts) == {str(i) for i in range(1, total + 1)}, "lines lost"
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\n{total} lines, {duplicates} duplicates (resent after the kill)")
    assert duplicates <= per_batch * 2, duplicates  # at most the chunk in flight, resent
    restarted = [
        r for r in first.records if r["conn"] > 1 and r["record"].get("container_id") == cid
    ]
    assert restarted, "the first receiver got nothing after it came back"
    log = collector.log()
    assert "marked down" in log
    assert f"server {first.address}: delivering again" in log
