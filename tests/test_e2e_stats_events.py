"""Stats and lifecycle records from a real Docker engine, through `forwarder run`.

The collector runs as a process, as a user runs it; its counts come from the status line it
logs on SIGUSR1. Nothing here sleeps to synchronise: every wait polls with a deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, get_args
from urllib.parse import urlencode

import pytest

from forwarder.records import LifecycleAction, LifecycleEvent, StatsEvent
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver, ReceivedRecord

MakeCollector = Callable[..., CollectorProcess]
SHIPPED = set(get_args(LifecycleAction))


COLLECTOR_DEFAULTS: dict[str, dict[str, Any]] = {"stats": {"interval": "1s"}}


def status(collector: CollectorProcess) -> dict[str, int | None]:
    return collector.status()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stats_of(records: list[ReceivedRecord], cid: str) -> list[ReceivedRecord]:
    return [
        r
        for r in records
        if r["tag"].startswith("docker.stats.") and r["record"].get("container_id") == cid
    ]


def events_of(records: list[ReceivedRecord], cid: str, action: str | None = None) -> list[Any]:
    return [
        r
        for r in records
        if r["tag"].startswith("docker.events.")
        and r["record"].get("container_id") == cid
        and (action is None or r["record"]["action"] == action)
    ]


def logs_of(records: list[ReceivedRecord], cid: str) -> list[str]:
    return [
        r["record"]["log"]
        for r in records
        if "log" in r["record"] and r["record"]["container_id"] == cid
    ]


def engine_events(engine: Engine, since_ns: int, until_ns: int) -> list[dict[str, Any]]:
    """The container events the engine holds between two times (``GET /events``)."""
    query = urlencode(
        {
            "since": f"{since_ns // 10**9}.{since_ns % 10**9:09d}",
            "until": f"{until_ns // 10**9}.{until_ns % 10**9:09d}",
            "filters": json.dumps({"type": ["container"]}),
        }
    )
    code, body = engine.api("GET", f"/events?{query}")
    assert code == 200, body
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


# --- stats --------------------------------------------------------------------------------


def test_busy_container_stats_every_second(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    cid = engine.run("sh", "-c", "while :; do :; done", name="busy")
    records = forward_receiver.wait_for(lambda rs: len(stats_of(rs, cid)) >= 4, timeout=30)
    mine = stats_of(records, cid)
    assert {r["tag"] for r in mine} == {"docker.stats.busy"}
    events = [StatsEvent.model_validate(r["record"]) for r in mine]
    for event in events:
        assert event.container_name == "/busy"
        assert event.image == engine.image
        assert event.memory_usage_bytes > 0
        assert event.memory_limit_bytes >= event.memory_usage_bytes
        assert event.pids >= 1
    # The first sample of a stream has nothing to compare with; the rest see a busy core.
    assert all(e.cpu_percent is not None and e.cpu_percent > 0 for e in events[1:])
    times = [r["time_ns"] for r in mine]
    assert times == sorted(times)
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
    assert 0.8 < statistics.median(gaps) < 1.5, gaps


def test_oneshot_polling_from_two_seconds(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sleep", "600", name="idle")
    collector = make_collector(forward_receiver.address, stats={"interval": "2s"})
    records = forward_receiver.wait_for(lambda rs: len(stats_of(rs, cid)) >= 3, timeout=30)
    events = [StatsEvent.model_validate(r["record"]) for r in stats_of(records, cid)]
    # One-shot samples carry no precpu_stats: the first record has no CPU figure, the next
    # ones are computed against the previous poll.
    assert events[0].cpu_percent is None
    assert all(e.cpu_percent is not None for e in events[1:])
    times = [r["time_ns"] for r in stats_of(records, cid)]
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
    assert all(1.5 < gap < 3.0 for gap in gaps), gaps
    assert status(collector)["stats_pollers"] == 1


def test_status_counts_log_lines_and_records_apart(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    """Log lines, stats records and lifecycle records are counted apart, read and delivered,
    and the last log line says which is which."""
    collector = make_collector(forward_receiver.address)
    cid = engine.run("sh", "-c", "seq 1 5; sleep 600", name="counted")
    forward_receiver.wait_for(
        lambda rs: (
            len(logs_of(rs, cid)) == 5
            and len(stats_of(rs, cid)) >= 2
            and len(events_of(rs, cid, "start")) == 1
        ),
        timeout=30,
    )

    def all_delivered() -> dict[str, int | None] | None:
        c = status(collector)
        if (
            c["log_lines_delivered"] == 5
            and (c["stats_records_delivered"] or 0) >= 2
            and (c["lifecycle_records_delivered"] or 0) >= 1
        ):
            return c
        return None

    counts = wait_until(
        all_delivered,
        timeout=10,
        what="the status line to count what was delivered",
    )
    # Stats records are neither log lines nor lifecycle records, and the reverse.
    assert counts["log_lines_read"] == 5
    read, delivered = counts["stats_records_read"], counts["stats_records_delivered"]
    assert read is not None
    assert delivered is not None
    assert delivered <= read
    read, delivered = counts["lifecycle_records_read"], counts["lifecycle_records_delivered"]
    assert read is not None
    assert delivered is not None
    assert delivered <= read <= 2
    for key in ("waiting_puts", "lost_corrupt", "disk_chunks", "disk_chunk_bytes"):
        assert counts[key] == 0, key
    code, _ = collector.terminate()
    assert code == 0
    (stopped,) = [line for line in collector.log().splitlines() if " stopped: " in line]
    assert " stopped: delivered 5 log lines, " in stopped
    assert " stats records and " in stopped
    assert " lifecycle record" in stopped


# --- lifecycle ----------------------------------------------------------------------------


def test_exit_3_gives_start_and_die_with_the_exit_code(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    since_ns = time.time_ns()
    cid = engine.run("sh", "-c", "exit 3", name="exit3")
    records = forward_receiver.wait_for(lambda rs: bool(events_of(rs, cid, "die")), timeout=30)
    mine = events_of(records, cid)
    assert [r["record"]["action"] for r in mine][:3] == ["create", "start", "die"]
    (die,) = events_of(records, cid, "die")
    assert die["tag"] == "docker.events.exit3"
    assert die["record"] == {
        "action": "die",
        "container_id": cid,
        "container_name": "/exit3",
        "image": engine.image,
        "exit_code": 3,
    }
    for r in mine:
        LifecycleEvent.model_validate(r["record"])
    # The record times are the engine's own event times, to the nanosecond.
    theirs = {
        (e["Action"], e["timeNano"])
        for e in engine_events(engine, since_ns, time.time_ns())
        if e["id"] == cid
    }
    assert {(r["record"]["action"], r["time_ns"]) for r in mine} <= theirs


def test_kill_carries_the_signal(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    cid = engine.run("sleep", "600", name="killed")
    forward_receiver.wait_for(lambda rs: bool(events_of(rs, cid, "start")), timeout=30)
    # sleep as PID 1 has no handler for USR1, so the kernel does not deliver it: it runs on.
    engine.docker("kill", "-s", "USR1", cid)
    forward_receiver.wait_for(lambda rs: bool(events_of(rs, cid, "kill")), timeout=30)
    engine.docker("kill", "-s", "KILL", cid)
    records = forward_receiver.wait_for(lambda rs: bool(events_of(rs, cid, "die")), timeout=30)
    assert [r["record"]["signal"] for r in events_of(records, cid, "kill")] == [10, 9]
    assert events_of(records, cid, "die")[0]["record"]["exit_code"] == 137


def test_health_check_gives_health_status(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    make_collector(forward_receiver.address)
    cid = engine.run(
        "sleep",
        "600",
        name="checked",
        options=["--health-cmd", "true", "--health-interval", "1s"],
    )
    records = forward_receiver.wait_for(
        lambda rs: bool(events_of(rs, cid, "health_status")), timeout=30
    )
    (first, *_) = events_of(records, cid, "health_status")
    assert first["tag"] == "docker.events.checked"
    assert first["record"]["health_status"] == "healthy"
    # The health check's exec_create/exec_start/exec_die events are not shipped.
    assert {r["record"]["action"] for r in events_of(records, cid)} <= SHIPPED


# --- no task or connection left behind ----------------------------------------------------

CHURN_ROUNDS = 10
CHURN_PER_ROUND = 20  # half stay up until removed, half exit at once (--rm)
# Slack over the idle baseline, once everything is gone:
# - tasks: 2, for work that comes and goes on its own (a chunk flush in progress, the disk
#   buffer's writer) whatever the number of containers seen;
# - fds and engine connections: 4. A stream that ends cleanly goes back into aiohttp's pool
#   as an idle keep-alive connection, and the pool closes those 15 to 30 s later (the wait
#   below covers that); the slack is for plain requests (inspect) that reuse one of them
#   meanwhile, and a disk buffer segment being rotated.
TASK_SLACK = 2
FD_SLACK = 4


def test_200_short_lived_containers_leave_nothing_behind(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    collector = make_collector(forward_receiver.address)
    base = status(collector)
    base_fds = open_fds(collector.pid)
    assert base["followers"] == 0
    assert base["stats_pollers"] == 0
    started = time.monotonic()
    seen: list[str] = []
    short_lived: list[str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for round_ in range(CHURN_ROUNDS):
            long_lived = list(
                pool.map(
                    lambda n: engine.run("sh", "-c", f"echo up-{n}; sleep 600"),
                    range(round_ * 100, round_ * 100 + CHURN_PER_ROUND // 2),
                )
            )
            short_lived += pool.map(
                lambda n: engine.run("sh", "-c", f"echo gone-{n}", options=["--rm"]),
                range(CHURN_PER_ROUND // 2),
            )
            seen += long_lived

            def round_has_stats(lived: list[str] = long_lived) -> bool:
                return all(stats_of(forward_receiver.records, cid) for cid in lived)

            wait_until(
                round_has_stats,
                timeout=60,
                what="a stats record from every long-lived container of the round",
            )
            peak = status(collector)
            engine.docker("rm", "-f", *long_lived)
            for cid in long_lived:
                engine.created.discard(cid)

    def drained() -> dict[str, int | None] | None:
        now = status(collector)
        return now if now["followers"] == 0 and now["stats_pollers"] == 0 else None

    wait_until(drained, timeout=60, what="every follower and stats task to end")
    churn_s = time.monotonic() - started
    base_tasks = base["tasks"] or 0

    def tasks_back() -> dict[str, int | None] | None:
        now = status(collector)
        return now if (now["tasks"] or 0) <= base_tasks + TASK_SLACK else None

    base_connections = base["engine_connections"]

    def fds_back() -> tuple[int, int | None] | None:
        fds, connections = open_fds(collector.pid), status(collector)["engine_connections"]
        if fds > base_fds + FD_SLACK:
            return None
        if connections is not None and connections > (base_connections or 0) + FD_SLACK:
            return None
        return fds, connections

    final = wait_until(
        tasks_back,
        timeout=30,
        what=lambda: f"the task count to return to {base_tasks} (+{TASK_SLACK})",
    )
    fds, connections = wait_until(
        fds_back,
        timeout=60,
        what=lambda: (
            f"open fds ({open_fds(collector.pid)}) and engine connections to return "
            f"to {base_fds} and {base_connections} (+{FD_SLACK})"
        ),
    )
    records = forward_receiver.records
    # Every container that was up got its logs and its lifecycle records through (a --rm
    # one may be gone before its log is read; its events are not).
    for cid in seen + short_lived:
        assert cid not in seen or logs_of(records, cid), cid
        actions = {r["record"]["action"] for r in events_of(records, cid)}
        assert {"create", "start", "die", "destroy"} <= actions, (cid, actions)
    print(
        f"\nchurn: {len(seen) + len(short_lived)} containers in {churn_s:.1f}s; "
        f"tasks {base['tasks']} -> "
        f"{peak['tasks']} (last round's peak) -> {final['tasks']}; fds {base_fds} -> {fds}; "
        f"engine connections {base_connections} -> {peak['engine_connections']} -> "
        f"{connections}"
    )


# --- engine restart -----------------------------------------------------------------------


def test_engine_restart_loses_nothing_the_engine_still_has(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    if not engine.is_private:
        pytest.skip("restarts the engine: needs the private one")
    collector = make_collector(forward_receiver.address)
    before = engine.run("sh", "-c", "echo before; sleep 600", name="before")
    always = engine.run(
        "sh", "-c", "echo run; sleep 600", name="always", options=["--restart", "always"]
    )
    forward_receiver.wait_for(
        lambda rs: bool(stats_of(rs, before) and stats_of(rs, always) and logs_of(rs, always)),
        timeout=30,
    )
    engine.stop_daemon()
    restarted_ns = time.time_ns()
    engine.start_daemon()
    wait_until(
        lambda: "docker engine: reachable again" in collector.log(),
        timeout=60,
        what="the collector to reconnect to the engine",
    )
    after = engine.run("sh", "-c", "echo after; sleep 600", name="after")
    records = forward_receiver.wait_for(
        lambda rs: bool(events_of(rs, after, "start")) and "after" in logs_of(rs, after),
        timeout=60,
    )
    # The restart policy started `always` again: its new run is followed too.
    records = forward_receiver.wait_for(
        lambda rs: logs_of(rs, always).count("run") == 2 and bool(stats_of(rs, after)),
        timeout=60,
    )
    wait_until(
        lambda: status(collector)["stats_pollers"] == 2,
        timeout=30,
        what="stats tasks for `always` and `after` only",
    )
    # Every shipped event the restarted engine still has arrived, and only once.
    theirs = Counter(
        (e["id"], e["Action"].partition(":")[0], e["timeNano"])
        for e in engine_events(engine, restarted_ns, time.time_ns())
        if e["Action"].partition(":")[0] in SHIPPED
    )
    ours = Counter(
        (r["record"]["container_id"], r["record"]["action"], r["time_ns"])
        for r in records
        if r["tag"].startswith("docker.events.")
    )
    assert theirs, "the restarted engine should have events (the starts at least)"
    assert {key: ours[key] for key in theirs} == dict(theirs)
    assert max(ours.values()) == 1, [key for key, n in ours.items() if n > 1]
    assert "Traceback" not in collector.log()
    print(
        f"\nrestart: {sum(theirs.values())} shipped events held by the restarted engine, "
        f"all received once; {len(ours)} lifecycle records in all, none twice"
    )
