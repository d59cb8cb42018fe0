"""Fault injection on a real engine: every line counted, lost and duplicated.

The oracle is the engine's own log of each container (the logs API): whatever the engine
holds must reach the receiver at least once. Each test prints its figures (`-s` shows them).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.docker.frames import Demuxer
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver

MakeCollector = Callable[..., CollectorProcess]

# 30,000 numbered lines at about 3,000 a second: 100 batches of 300, a tenth of a second apart.
PACED = (
    "b=0; while [ $b -lt {batches} ]; do seq $((b*300+1)) $((b*300+300)) | sed 's/^/n/'; "
    "b=$((b+1)); sleep 0.1; done; sleep 600"
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


COLLECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "output": {
        "flush_interval": "200ms",
        "ack_timeout": "2s",
        "connect_timeout": "2s",
        "retry_wait": "100ms",
        "retry_max_wait": "1s",
        "heartbeat_interval": "200ms",
    },
    "service": {"shutdown_timeout": "3s"},
}


Line = tuple[int, str]  # (engine timestamp in ns, text): the same text can come twice


def engine_lines(engine: Engine, cid: str) -> list[Line]:
    raw = Demuxer().feed(engine.logs_api_bytes(cid, timestamps=True))
    return [(line.ts_ns, line.data.decode()) for line in raw]


def texts(lines: list[Line]) -> list[str]:
    return [text for _, text in lines]


def received(records: list[Any], cid: str) -> Counter[Line]:
    return Counter(
        (r["time_ns"], r["record"]["log"])
        for r in records
        if r["record"]["container_id"] == cid and "log" in r["record"]
    )


def tally(records: list[Any], cid: str, expected: list[Line], scenario: str) -> tuple[int, int]:
    """Lines of ``expected`` that never arrived, and extra copies of lines that did. A line
    is its (engine timestamp, text): unique in the engine's log, so a second copy is a
    duplicate, and lines logged after ``expected`` was read count only when doubled."""
    got = received(records, cid)
    want = Counter(expected)
    lost = sum((want - got).values())
    duplicated = sum(count - max(1, want[line]) for line, count in got.items() if count > 1)
    if lost:
        print(f"\n{scenario}: lost {sorted(want - got)[:10]}")
    if duplicated:
        print(f"\n{scenario}: duplicated {[line for line, n in got.items() if n > 1][:10]}")
    print(
        f"\n{scenario}: {len(expected)} lines, lost {lost}, duplicated {duplicated} "
        f"({100 * duplicated / max(1, len(expected)):.2f} %)"
    )
    return lost, duplicated


def logged_past(engine: Engine, cid: str, n: int) -> Callable[[], bool]:
    def probe() -> bool:
        tail = engine.logs_api_bytes(cid, tail=1)
        digits = "".join(ch for ch in tail[8:].decode(errors="replace") if ch.isdigit())
        return bool(digits) and int(digits) >= n

    return probe


def all_arrived(cid: str, last: str | Line) -> Callable[[list[Any]], bool]:
    """The line (or the text) has arrived; lines of one container arrive in order."""

    def arrived(records: list[Any]) -> bool:
        for r in reversed(records):
            if r["record"]["container_id"] == cid and "log" in r["record"]:
                line = (r["time_ns"], r["record"]["log"])
                if line == last or line[1] == last:
                    return True
        return False

    return arrived


def output_warnings(collector: CollectorProcess) -> list[str]:
    """What the collector said about failing deliveries."""
    return [line for line in collector.log().splitlines() if "WARNING forwarder.forward" in line]


@pytest.mark.parametrize("log_source", ["api", "file"])
def test_receiver_outage_of_three_seconds(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    log_source: str,
) -> None:
    collector = make_collector(forward_receiver.address, docker={"log_source": log_source})
    cid = engine.run("sh", "-c", PACED.format(batches=100))
    forward_receiver.wait_for(lambda rs: len(rs) >= 3000, timeout=30)
    forward_receiver.stop()
    wait_until(logged_past(engine, cid, 12000), timeout=30, what="3 s more of lines")
    forward_receiver.start()
    records = forward_receiver.wait_for(all_arrived(cid, "n30000"), 60)
    lost, duplicated = tally(records, cid, engine_lines(engine, cid), "receiver outage")
    assert lost == 0
    assert duplicated < 600  # under 2 %
    # Logged once per episode, not once per retry (there were dozens of retries).
    assert 1 <= len(output_warnings(collector)) <= 2, collector.log()


@pytest.mark.parametrize("log_source", ["api", "file"])
def test_collector_killed_and_restarted(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    log_source: str,
) -> None:
    collector = make_collector(forward_receiver.address, docker={"log_source": log_source})
    cid = engine.run("sh", "-c", PACED.format(batches=100))
    forward_receiver.wait_for(lambda rs: len(rs) >= 9000, timeout=30)
    collector.kill()
    wait_until(logged_past(engine, cid, 15000), timeout=30, what="more lines while down")
    collector.start()
    records = forward_receiver.wait_for(all_arrived(cid, "n30000"), 60)
    lost, duplicated = tally(records, cid, engine_lines(engine, cid), "collector SIGKILL")
    assert lost == 0
    assert duplicated < 600


# As PACED, but after 21,000 lines the container waits for /tmp/go before the last 9,000.
PAUSED = (
    "b=0; while [ $b -lt 100 ]; do seq $((b*300+1)) $((b*300+300)) | sed 's/^/n/'; "
    "b=$((b+1)); sleep 0.1; if [ $b -eq 70 ]; then "
    "while [ ! -e /tmp/go ]; do sleep 0.05; done; fi; done; sleep 600"
)


def test_collector_killed_just_after_an_outage_replays_little(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    """The receiver is away for 3 s and the backlog goes to the disk buffer; the collector
    is killed as soon as the backlog is through (the container has gone quiet, so no new
    chunk follows it to disk). The next start sends again only what was delivered but not
    yet recorded as such, which is bounded by design, however busy the machine: the chunks
    in flight (4), the delivered disk chunks whose release is not yet written
    (UNRECORDED_RELEASES), what was acked since the last positions save, and the chunk the
    outage caught unacked. In chunks of 4 KiB (about 30 lines) that is well under 2 % of
    the lines; releases written only with the next append sent the whole backlog again."""
    collector = make_collector(forward_receiver.address, output={"chunk_limit": "4KiB"})
    cid = engine.run("sh", "-c", PAUSED)
    forward_receiver.wait_for(lambda rs: len(rs) >= 12000, timeout=30)
    forward_receiver.stop()
    wait_until(logged_past(engine, cid, 21000), timeout=30, what="3 s more of lines")
    forward_receiver.start()
    forward_receiver.wait_for(all_arrived(cid, "n21000"), 60)  # the backlog went through
    collector.kill()
    engine.docker("exec", cid, "touch", "/tmp/go")
    collector.start()
    records = forward_receiver.wait_for(all_arrived(cid, "n30000"), 60)
    lost, duplicated = tally(records, cid, engine_lines(engine, cid), "SIGKILL after outage")
    assert lost == 0
    assert duplicated < 600  # under 2 %


def test_engine_restart_while_containers_log(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    if not engine.is_private:
        pytest.skip("needs the private engine, which the test stops and starts")
    collector = make_collector(forward_receiver.address)
    steady = engine.run(
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo s$i; sleep 0.01; done",
        options=["--restart", "unless-stopped"],
    )
    forward_receiver.wait_for(lambda rs: len(rs) >= 100, timeout=30)
    engine.stop_daemon()
    engine.start_daemon()
    later = engine.run("sh", "-c", "seq 1 500 | sed 's/^/l/'; sleep 600")
    forward_receiver.wait_for(all_arrived(later, "l500"), 60)
    # The steady container restarted with the engine; its log now holds both runs.
    expected = engine_lines(engine, steady)
    records = forward_receiver.wait_for(all_arrived(steady, expected[-1]), 60)
    lost, duplicated = tally(records, steady, expected, "engine restart (steady)")
    assert lost == 0
    assert duplicated == 0
    assert tally(records, later, engine_lines(engine, later), "engine restart (later)") == (0, 0)
    assert "reachable again" in collector.log()


def committed_position(state_dir: Path, cid: str) -> int | None:
    """The position the collector saved for a container: ts_ns of its last taken line."""
    try:
        data = json.loads((state_dir / "positions.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    position = data["positions"].get(cid)
    return int(position[0]) if position else None


def last_line_ns(engine: Engine, cid: str) -> int:
    return Demuxer().feed(engine.logs_api_bytes(cid, timestamps=True))[-1].ts_ns


def test_container_removed_while_the_receiver_is_down(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    state_dir: Path,
) -> None:
    make_collector(forward_receiver.address)
    forward_receiver.stop()
    cid = engine.run("sh", "-c", "seq 1 3000 | sed 's/^/r/'; sleep 600")
    wait_until(
        lambda: texts(engine_lines(engine, cid))[-1:] == ["r3000"],
        timeout=30,
        what="the container to log",
    )
    expected = engine_lines(engine, cid)
    last_ns = last_line_ns(engine, cid)
    # Its lines are safe once their position is committed: they are in the disk buffer.
    wait_until(
        lambda: committed_position(state_dir, cid) == last_ns,
        timeout=30,
        what="the lines to reach the disk buffer",
    )
    engine.rm(cid)
    forward_receiver.start()
    records = forward_receiver.wait_for(all_arrived(cid, "r3000"), 60)
    lost, duplicated = tally(records, cid, expected, "removed while receiver down")
    assert lost == 0
    assert duplicated < 60


@pytest.mark.parametrize("fault", ["never_acks", "garbage"])
def test_a_receiver_that_misbehaves_then_recovers(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
    fault: str,
) -> None:
    receiver = make_forward_receiver(ack=fault != "never_acks", garbage=fault == "garbage")
    collector = make_collector(receiver.address, output={"ack_timeout": "1s"})
    cid = engine.run("sh", "-c", "seq 1 2000 | sed 's/^/m/'; sleep 600")
    receiver.wait_for(lambda rs: len(rs) >= 1, timeout=30)
    wait_until(
        lambda: output_warnings(collector),
        timeout=30,
        what="the collector to notice the fault",
    )
    assert collector.running()
    receiver.ack, receiver.garbage = True, False  # a good receiver is back
    records = receiver.wait_for(all_arrived(cid, "m2000"), 60)
    lost, _ = tally(records, cid, engine_lines(engine, cid), f"receiver {fault}")
    assert lost == 0
    assert 1 <= len(output_warnings(collector)) <= 2, collector.log()


def test_a_torn_disk_buffer_tail_is_reported_and_the_rest_delivered(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    state_dir: Path,
) -> None:
    forward_receiver.stop()
    collector = make_collector(forward_receiver.address, output={"chunk_limit": "16KiB"})
    cid = engine.run("sh", "-c", "seq 1 5000 | sed 's/^/t/'; sleep 600")
    wait_until(
        lambda: texts(engine_lines(engine, cid))[-1:] == ["t5000"],
        timeout=30,
        what="the container to log",
    )
    last_ns = last_line_ns(engine, cid)
    wait_until(
        lambda: committed_position(state_dir, cid) == last_ns,
        timeout=30,
        what="the lines to reach the disk buffer",
    )
    assert collector.terminate()[0] == 0
    segments = sorted((state_dir / "buffer").glob("seg-*.fwd"))
    assert segments, "nothing in the disk buffer"
    with_data = [p for p in segments if p.stat().st_size > 100]
    last = with_data[-1]
    size = last.stat().st_size
    os.truncate(last, size - 50)  # the middle of its last record, as a crash would leave it
    forward_receiver.start()
    collector.start()
    forward_receiver.wait_for(all_arrived(cid, "t4000"), 60)
    # The rest of the backlog may still be on its way: a clean stop delivers what is held.
    assert collector.terminate()[0] == 0
    records = forward_receiver.wait_for(0)
    warnings = [line for line in collector.log().splitlines() if "damaged" in line]
    assert len(warnings) == 1
    assert last.name in warnings[0]
    got = {text for _, text in received(records, cid)}
    lost = {f"t{i}" for i in range(1, 5001)} - got
    print(
        f"\ntorn tail: {len(lost)} lines in the torn record lost and reported, "
        f"{5000 - len(lost)} delivered"
    )
    # Only the torn record's lines are missing: one chunk of 16 KiB holds < 700 lines.
    assert 0 < len(lost) < 700
    assert max(int(x[1:]) for x in lost) == 5000


def test_sigterm_with_data_buffered_delivers_on_the_next_start(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    """At SIGTERM the lines are only in memory (sent, never acked): they go to the disk
    buffer, and the next start delivers them although the container is gone by then."""
    forward_receiver.ack = False
    collector = make_collector(forward_receiver.address, output={"ack_timeout": "60s"})
    cid = engine.run("sh", "-c", "seq 1 2000 | sed 's/^/g/'; sleep 600")
    # All read; the first chunk was sent and never acked, the rest wait in memory.
    wait_until(
        lambda: (collector.status()["log_lines_read"] or 0) >= 2000,
        timeout=30,
        what="the collector to read the lines",
    )
    forward_receiver.wait_for(1, timeout=30)
    code, seconds = collector.terminate()
    assert code == 0
    assert seconds < 10
    assert "kept in the disk buffer" in collector.log()
    engine.rm(cid)  # only the disk buffer has the lines now
    forward_receiver.records.clear()
    forward_receiver.ack = True
    collector.start()
    records = forward_receiver.wait_for(all_arrived(cid, "g2000"), 60)
    got = Counter(text for (_, text) in received(records, cid).elements())
    lost = sum(1 for i in range(1, 2001) if got[f"g{i}"] == 0)
    print(
        f"\nSIGTERM with data buffered: 2000 lines, lost {lost}, "
        f"duplicated {sum(got.values()) - len(got)}"
    )
    assert lost == 0


def test_sigterm_with_no_server_exits_once_everything_is_on_disk(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    """No server answers and every chunk is durable on disk: SIGTERM exits without sitting
    out shutdown_timeout (60 s here; the 20 s deadline is a bound, not a speed test), says
    why, and the next start delivers the lines and logs where it resumes as RFC 3339."""
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    collector = make_collector(dead, service={"shutdown_timeout": "60s"})
    cid = engine.run("sh", "-c", "seq 1 300 | sed 's/^/d/'; sleep 600")
    wait_until(
        lambda: (
            "no server can take chunks" in collector.log()
            and collector.status()["log_lines_read"] == 300
        ),
        timeout=30,
        what="the collector to read the lines with no server to take them",
    )
    code, _ = collector.terminate(timeout=20)
    log = collector.log()
    assert code == 0, log
    assert "stopping: delivering what is held (up to 1m)" in log
    assert "no server takes chunks and everything left is on disk, so not waiting" in log
    assert "chunks kept in the disk buffer for the next start" in log
    collector.config_path.write_text(
        collector.config_path.read_text().replace(dead, forward_receiver.address)
    )
    collector.start()
    records = forward_receiver.wait_for(all_arrived(cid, "d300"), 30)
    assert {f"d{i}" for i in range(1, 301)} <= set(texts(list(received(records, cid))))
    # The disk buffer's chunks go out at once, maybe before the engine is listed: wait for it.
    wait_until(
        lambda: "following from" in collector.log(),
        timeout=30,
        what=lambda: "the collector to follow the container again: " + collector.all_logs()[-6000:],
    )
    (following,) = [line for line in collector.log().splitlines() if "following from" in line]
    assert re.search(
        r"following from \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{9})?Z \((file \S+|api)\)$", following
    )


def test_a_container_that_lived_while_the_collector_was_down(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    collector = make_collector(forward_receiver.address)
    assert collector.terminate()[0] == 0
    cid = engine.run("sh", "-c", "seq 1 1000 | sed 's/^/d/'")
    engine.wait_exited(cid)
    collector.start()
    records = forward_receiver.wait_for(all_arrived(cid, "d1000"), 60)
    assert tally(records, cid, engine_lines(engine, cid), "lived while down") == (0, 0)
    assert texts(engine_lines(engine, cid)) == [f"d{i}" for i in range(1, 1001)]


def test_a_run_that_never_reached_the_engine_keeps_the_catch_up_horizon(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    tmp_path: Path,
) -> None:
    """A container lives and exits while the collector is down; a run with a wrong socket
    comes and goes meanwhile. It never saw the engine, so the next run still reads the
    container (its own save time must not become the catch-up horizon)."""
    collector = make_collector(forward_receiver.address)
    assert collector.terminate()[0] == 0
    cid = engine.run("sh", "-c", "seq 1 1000 | sed 's/^/w/'")
    engine.wait_exited(cid)
    wrong = make_collector(
        forward_receiver.address, docker={"host": f"unix://{tmp_path}/no-engine.sock"}
    )
    assert wrong.terminate()[0] == 0
    collector.start()
    records = forward_receiver.wait_for(all_arrived(cid, "w1000"), 30)
    assert tally(records, cid, engine_lines(engine, cid), "after a run without engine") == (0, 0)
