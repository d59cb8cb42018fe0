"""Log lines from a real Docker engine to real Forward receivers, through `forwarder run`.

Every test here runs the collector as a process, as a user does, and checks what the
receiver got: the records, their keys and times, nothing missing, nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from forwarder.docker.frames import Demuxer
from forwarder.records import LogEvent
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver, NodeReceiver
from tests.helpers import log_view

MakeCollector = Callable[..., CollectorProcess]


def logs_of(records: list[Any], container_id: str) -> list[str]:
    """The log lines of a container (its lifecycle records left out)."""
    return [
        r["record"]["log"]
        for r in records
        if r["record"]["container_id"] == container_id and "log" in r["record"]
    ]


def test_container_running_before_the_collector_is_read_from_head(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sh", "-c", "echo out-1; echo err-1 >&2; echo out-2; sleep 600", name="early")
    engine.docker("logs", cid)  # the lines are in the engine's log before we start
    make_collector(forward_receiver.address)
    records = forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 3)
    mine = [r for r in records if r["record"]["container_id"] == cid]
    assert sorted((r["record"]["source"], r["record"]["log"]) for r in mine) == [
        ("stderr", "err-1"),
        ("stdout", "out-1"),
        ("stdout", "out-2"),
    ]
    for r in mine:
        assert r["tag"] == "docker.early"
        assert set(r["record"]) == {"container_id", "container_name", "source", "log"}
        assert r["record"]["container_name"] == "/early"
        LogEvent.model_validate(r["record"])
    # The record times are the engine's own timestamps, to the nanosecond.
    raw = Demuxer().feed(engine.logs_api_bytes(cid, timestamps=True))
    assert sorted(r["time_ns"] for r in mine) == sorted(line.ts_ns for line in raw)


# A container that says "ready", then waits for SIGUSR1 before it goes on: busybox sh as PID 1
# gets the signal because it traps it, and `wait` returns at once when a trapped signal comes.
GATE = "trap 'kill $s' USR1; sleep 600 & s=$!; echo ready; wait $s; "


def open_gate(engine: Engine, receiver: ForwardReceiver, cid: str) -> None:
    """Once the collector has shipped the container's "ready", let the container go on: what
    it writes next can only reach the receiver through the collector's live stream."""
    receiver.wait_for(lambda rs: "ready" in logs_of(rs, cid), timeout=30)
    engine.docker("kill", "-s", "USR1", cid)


def test_container_started_later_is_read_whole_in_order(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    cid = engine.run("sh", "-c", GATE + "seq 1 2000; sleep 600")
    open_gate(engine, forward_receiver, cid)
    records = forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 2001, timeout=30)
    assert logs_of(records, cid) == ["ready", *(str(i) for i in range(1, 2001))]


def test_stdout_and_stderr_long_lines_are_kept_apart_and_whole(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    script = (
        GATE + "head -c 40000 /dev/zero | tr '\\0' o; echo; "
        "head -c 40000 /dev/zero | tr '\\0' e >&2; echo >&2; "
        "echo short-out; echo short-err >&2; sleep 600"
    )
    cid = engine.run("sh", "-c", script)
    open_gate(engine, forward_receiver, cid)
    records = forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 5, timeout=30)
    mine = sorted(
        (r["record"]["source"], r["record"]["log"])
        for r in records
        if r["record"]["container_id"] == cid and "log" in r["record"]
    )
    assert mine == [
        ("stderr", "e" * 40000),
        ("stderr", "short-err"),
        ("stdout", "o" * 40000),
        ("stdout", "ready"),
        ("stdout", "short-out"),
    ]


def test_tty_container(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    cid = engine.run("sh", "-c", GATE + "echo tty-1; echo tty-2; sleep 600", tty=True)
    open_gate(engine, forward_receiver, cid)
    records = forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 3, timeout=30)
    mine = [
        r["record"] for r in records if r["record"]["container_id"] == cid and "log" in r["record"]
    ]
    assert [(r["source"], r["log"]) for r in mine] == [
        ("stdout", "ready"),
        ("stdout", "tty-1"),
        ("stdout", "tty-2"),
    ]


def test_records_match_dockers_fluentd_log_driver(
    engine: Engine,
    make_forward_receiver: Callable[..., ForwardReceiver],
    make_collector: MakeCollector,
) -> None:
    """The same container, logged by Docker's own fluentd driver to one receiver and read by
    forwarder (through the engine's dual-logging cache) to another: same tag, same keys, same
    values, same nanosecond times."""
    ours = make_forward_receiver()
    drivers = make_forward_receiver()
    make_collector(ours.address)
    port = drivers.address.rsplit(":", 1)[1]
    cid = engine.docker(
        "run",
        "-d",
        "--name",
        "drv",
        "--label",
        "forwarder-test=1",
        "--network",
        "host",
        "--log-driver",
        "fluentd",
        "--log-opt",
        f"fluentd-address=127.0.0.1:{port}",
        "--log-opt",
        "tag=docker.{{.Name}}",
        "--log-opt",
        "fluentd-sub-second-precision=true",
        engine.image,
        "sh",
        "-c",
        "sleep 0.5; echo driver-out; echo driver-err >&2; echo 'ünï €'; sleep 600",
    ).stdout.strip()
    theirs = drivers.wait_for(3, timeout=30)
    mine = ours.wait_for(lambda rs: len(logs_of(rs, cid)) >= 3, timeout=30)

    assert log_view(mine, cid) == log_view(theirs, cid)


def test_sigterm_gives_a_clean_exit(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sh", "-c", "echo before-term; sleep 600")
    collector = make_collector(forward_receiver.address)
    forward_receiver.wait_for(lambda rs: "before-term" in logs_of(rs, cid))
    code, seconds = collector.terminate()
    assert code == 0, collector.log()
    assert seconds < 10
    assert "stopped:" in collector.log()
    assert "Traceback" not in collector.log()


def test_restart_resumes_without_loss_or_duplicates(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run(
        "sh",
        "-c",
        "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo n$i; sleep 0.01; done; sleep 600",
    )
    collector = make_collector(forward_receiver.address)
    forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 50, timeout=30)
    code, _ = collector.terminate()
    assert code == 0
    collector.start()  # same config, same state dir
    records = forward_receiver.wait_for(lambda rs: "n400" in logs_of(rs, cid), timeout=60)
    assert logs_of(records, cid) == [f"n{i}" for i in range(1, 401)]


def test_unreadable_log_driver_is_skipped_with_one_warning(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    silent = engine.run("sh", "-c", "echo unseen; sleep 600", options=["--log-driver", "none"])
    loud = engine.run("sh", "-c", "echo seen; sleep 600")
    collector = make_collector(forward_receiver.address)
    forward_receiver.wait_for(lambda rs: "seen" in logs_of(rs, loud), timeout=30)
    warnings = [
        line
        for line in collector.log().splitlines()
        if silent[:12] in line or "can't be read" in line
    ]
    assert len([w for w in warnings if "WARNING" in w]) == 1, collector.log()
    assert logs_of(forward_receiver.records, silent) == []


def test_delivery_to_fluents_own_forward_server(
    engine: Engine, node_receiver: NodeReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sh", "-c", "seq 1 500; sleep 600", name="to-node")
    make_collector(node_receiver.address)
    records = node_receiver.wait_for(
        lambda rs: sum(1 for r in rs if r["record"].get("container_id") == cid) >= 500,
        timeout=30,
    )
    mine = [r for r in records if r["record"].get("container_id") == cid]
    assert [r["record"]["log"] for r in mine] == [str(i) for i in range(1, 501)]
    assert {r["tag"] for r in mine} == {"docker.to-node"}


def test_a_first_run_that_never_reached_the_engine_leaves_the_next_a_first_start(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    tmp_path: Path,
) -> None:
    """A run with a wrong socket writes its positions file; the next run, with the right
    one, still starts fresh: with read_from = "tail", none of the history is sent."""
    cid = engine.run(
        "sh",
        "-c",
        "seq 1 300 | sed 's/^/h/'; i=0; while :; do i=$((i+1)); echo n$i; sleep 0.05; done",
    )
    wait_until(
        lambda: b"h300" in engine.logs_api_bytes(cid), timeout=30, what="the history to be logged"
    )
    wrong = make_collector(
        forward_receiver.address,
        docker={"host": f"unix://{tmp_path}/no-engine.sock", "read_from": "tail"},
    )
    assert (tmp_path / "state" / "positions.json").exists()
    assert wrong.terminate()[0] == 0
    make_collector(forward_receiver.address, docker={"read_from": "tail"})
    # Lines of one container arrive in order: any history would come before these.
    records = forward_receiver.wait_for(lambda rs: len(logs_of(rs, cid)) >= 10, timeout=30)
    history = [line for line in logs_of(records, cid) if line.startswith("h")]
    assert history == [], f"{len(history)} lines of history sent"
