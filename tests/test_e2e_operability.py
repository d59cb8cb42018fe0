"""Operating a running collector: /metrics, /healthz, /readyz, JSON logs, reload (SIGHUP).

Each test runs `forwarder run` as a process on the real engine, with its HTTP listener on a
free port, and checks what an operator sees: scrapes, probe answers, log lines, and what
the receivers got.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from forwarder.docker.frames import Demuxer
from tests.harness.certs import make_pki
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver, server_tls_context

MakeCollector = Callable[..., CollectorProcess]

# A steady stream of numbered lines, about 400 a second, until the container is stopped.
STREAM = "i=0; while true; do i=$((i+1)); echo $i; [ $((i % 20)) = 0 ] && sleep 0.05; done"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(address, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def log_lines(records: list[Any], cid: str) -> list[str]:
    return [
        r["record"]["log"]
        for r in records
        if r["record"].get("container_id") == cid and "log" in r["record"]
    ]


def numbers(records: list[Any], cid: str) -> list[int]:
    return [int(line) for line in log_lines(records, cid)]


def test_metrics_count_exactly_what_the_receiver_got(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    address = f"127.0.0.1:{free_port()}"
    cid = engine.run("sh", "-c", "seq 1 3000; sleep 600")
    make_collector(forward_receiver.address, service={"http_listen": address})
    log_read = ("forwarder_records_read_total", (("kind", "log"),))
    log_delivered = ("forwarder_records_delivered_total", (("kind", "log"),))
    wait_until(
        lambda: scrape(address).get(log_delivered) == 3000, timeout=60, what="3000 delivered"
    )
    samples = scrape(address)
    received = forward_receiver.records
    assert numbers(received, cid) == list(range(1, 3001))
    assert samples[log_read] == samples[log_delivered] == len(log_lines(received, cid))
    kinds = ("log", "stats", "lifecycle")
    delivered = sum(samples[("forwarder_records_delivered_total", (("kind", k),))] for k in kinds)
    assert delivered == len(received)
    assert samples[("forwarder_chunks_delivered_total", ())] == forward_receiver.chunks_received
    server = forward_receiver.address.removeprefix("tcp://")
    assert samples[("forwarder_server_up", (("server", f"tcp://{server}"),))] == 1
    assert samples[("forwarder_engine_up", ())] == 1
    assert samples[("forwarder_followers", (("source", "api"),))] == 1
    assert ("forwarder_buffer_bytes", (("tier", "disk"),)) in samples
    assert samples[("forwarder_delivery_lag_seconds", ())] >= 0
    # bytes: every log record made was delivered, as made (no compression), each chunk's
    # PackedForward message adding its tag, framing and options
    log_bytes = samples[("forwarder_record_bytes_total", (("kind", "log"),))]
    framing = samples[("forwarder_delivered_bytes_total", (("kind", "log"),))] - log_bytes
    assert 0 < framing <= 128 * forward_receiver.chunks_received
    assert log_bytes > 3000 * len(cid)  # each line carries the container's id
    # per server: one connection, an ack time for each chunk, no failure
    name = (("server", f"tcp://{server}"),)
    assert samples[("forwarder_server_connections_total", name)] == 1
    assert samples[("forwarder_server_connected", name)] == 1
    rtt_count = samples[("forwarder_server_ack_rtt_seconds_count", name)]
    assert rtt_count == forward_receiver.chunks_received
    inf = (("le", "+Inf"), *name)
    assert samples[("forwarder_server_ack_rtt_seconds_bucket", inf)] == rtt_count
    assert samples[("forwarder_server_ack_rtt_seconds_sum", name)] > 0
    assert not [key for key in samples if key[0] == "forwarder_server_failures_total"]
    assert get(address, "/healthz") == (200, '{"status": "ok"}\n')
    assert get(address, "/readyz") == (200, '{"status": "ok"}\n')


def test_server_failures_are_counted_by_reason(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    untrusted = make_forward_receiver(
        tls=server_tls_context(pki.other_server.cert, pki.other_server.key)
    )
    plain = make_forward_receiver()
    address = f"127.0.0.1:{free_port()}"
    engine.run("sh", "-c", "seq 1 20; sleep 600")
    collector = make_collector(
        f"tls://localhost:{untrusted.port}",
        service={"http_listen": address},
        output={"servers": [f"tls://localhost:{untrusted.port}", plain.address]},
        **{"output.tls": {"ca_file": str(pki.ca.cert)}},
    )
    tls_failures = (
        "forwarder_server_failures_total",
        (("reason", "tls_handshake"), ("server", f"tls://localhost:{untrusted.port}")),
    )
    wait_until(
        lambda: scrape(address).get(tls_failures, 0) >= 1,
        timeout=30,
        what=lambda: f"a TLS failure: {collector.log()[-1500:]}",
    )
    samples = scrape(address)
    failures = {key: v for key, v in samples.items() if key[0] == tls_failures[0]}
    assert set(failures) == {tls_failures}, failures
    plain.wait_for(20, timeout=30)


def test_readyz_fails_while_the_only_server_is_down_and_healthz_holds(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    address = f"127.0.0.1:{free_port()}"
    engine.run("sh", "-c", STREAM)
    make_collector(
        forward_receiver.address,
        service={"http_listen": address},
        buffer={"mode": "memory"},  # no disk buffer to hold what comes meanwhile
    )
    wait_until(lambda: get(address, "/readyz")[0] == 200, timeout=30, what="ready")
    forward_receiver.stop()
    wait_until(lambda: get(address, "/readyz")[0] == 503, timeout=30, what="not ready")
    status, body = get(address, "/readyz")
    assert status == 503
    assert json.loads(body) == {
        "status": "failing",
        "reasons": ['no server is up, and [buffer] mode = "memory" keeps no backlog'],
    }
    assert get(address, "/healthz")[0] == 200
    forward_receiver.start()
    wait_until(lambda: get(address, "/readyz")[0] == 200, timeout=30, what="ready again")
    assert get(address, "/healthz")[0] == 200


def test_a_second_collector_whose_address_is_taken_ships_and_says_so(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    cid = engine.run("sh", "-c", "seq 1 500; sleep 600")
    first_receiver, second_receiver = make_forward_receiver(), make_forward_receiver()
    first = make_collector(first_receiver.address, service={"http_listen": address})
    wait_until(lambda: get(address, "/healthz")[0] == 200, timeout=30, what="the listener")
    second = make_collector(
        second_receiver.address,
        start=False,
        service={"http_listen": address},
        state={"dir": str(tmp_path / "state-2")},
    )
    second.workdir = tmp_path / "second"  # its own log file
    second.workdir.mkdir()
    second.start()
    for receiver in (first_receiver, second_receiver):
        records = receiver.wait_for(lambda rs: len(log_lines(rs, cid)) >= 500, timeout=30)
        assert numbers(records, cid) == list(range(1, 501))
    wait_until(lambda: "[service] http_listen" in second.log(), timeout=10, what="the error")
    (error,) = [line for line in second.log().splitlines() if "http_listen" in line]
    assert " ERROR " in error
    assert address in error
    assert "[service] http_listen" not in first.log()
    # Once the first one is gone, the second one takes the address.
    first.stop()
    wait_until(lambda: f"listening on {address} now" in second.log(), timeout=15, what="the rebind")
    assert scrape(address)[("forwarder_records_delivered_total", (("kind", "log"),))] == 500


def test_json_log_format_is_one_object_per_line_for_a_whole_run(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sh", "-c", "seq 1 10; sleep 600", name="jsonlogs")
    collector = make_collector(
        forward_receiver.address,
        service={"log_format": "json", "http_listen": f"127.0.0.1:{free_port()}"},
    )
    forward_receiver.wait_for(lambda rs: len(log_lines(rs, cid)) >= 10, timeout=30)
    os.kill(collector.pid, signal.SIGUSR1)  # the status line too
    wait_until(lambda: '"status: tasks=' in collector.log(), timeout=10, what="the status")
    code, _ = collector.terminate()
    assert code == 0
    lines = [json.loads(line) for line in collector.log().splitlines()]
    assert len(lines) >= 4  # running, following, status, stopping, stopped
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
        assert line["time"].endswith("+00:00")
    (following,) = [line for line in lines if "following" in line["message"]]
    assert following["container"] == "/jsonlogs"
    assert following["container_id"] == cid
    assert lines[-1]["message"].startswith("stopped: delivered 10 log lines")


def test_sighup_with_an_invalid_config_keeps_the_running_one_and_says_why(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sh", "-c", STREAM)
    collector = make_collector(forward_receiver.address)
    forward_receiver.wait_for(lambda rs: len(log_lines(rs, cid)) >= 50, timeout=30)
    good = collector.config_path.read_text()
    collector.config_path.write_text(good + '\n[bogus]\nkey = 1\n[service]\nlog_level = "loud"\n')
    check = subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "check", "--config", str(collector.config_path)],
        capture_output=True,
        text=True,
        env=collector.env,
        timeout=60,
    )
    assert check.returncode == 2
    messages = [line.strip() for line in check.stderr.splitlines()[1:]]
    assert len(messages) == 2
    os.kill(collector.pid, signal.SIGHUP)
    wait_until(lambda: "rejected" in collector.log(), timeout=10, what="the rejection")
    for message in messages:
        assert message in collector.log()
    shipped = len(log_lines(forward_receiver.records, cid))
    forward_receiver.wait_for(lambda rs: len(log_lines(rs, cid)) >= shipped + 50, timeout=30)
    assert collector.running()


def test_sighup_swaps_the_servers_under_a_steady_stream_without_losing_a_line(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
) -> None:
    old, new = make_forward_receiver(), make_forward_receiver()
    cid = engine.run("sh", "-c", STREAM)
    collector = make_collector(old.address)
    old.wait_for(lambda rs: len(log_lines(rs, cid)) >= 200, timeout=30)
    text = collector.config_path.read_text()
    collector.config_path.write_text(text.replace(old.address, new.address))
    os.kill(collector.pid, signal.SIGHUP)
    wait_until(lambda: "applied output.servers" in collector.log(), timeout=10, what="reload")
    new.wait_for(lambda rs: len(log_lines(rs, cid)) >= 200, timeout=30)
    engine.docker("stop", "-t", "0", cid)
    written = len(Demuxer().feed(engine.logs_api_bytes(cid, timestamps=True)))
    # The stream went on through the new server (which may also get a few of the old one's
    # unacked chunks again: at least once).
    assert max(numbers(new.records, cid)) > max(numbers(old.records, cid))

    def arrived() -> set[int]:
        return set(numbers(old.records, cid)) | set(numbers(new.records, cid))

    wait_until(
        lambda: arrived() >= set(range(1, written + 1)),
        timeout=30,
        what=lambda: f"lines missing: {sorted(set(range(1, written + 1)) - arrived())[:10]}",
    )
    collector.terminate()
    both = numbers(old.records, cid) + numbers(new.records, cid)
    repeated = [n for n, times in Counter(both).items() if times > 1]
    # At least once: only the chunks whose acks were in flight at the swap may go twice.
    assert len(repeated) < 400, repeated[:10]
