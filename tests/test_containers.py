"""Discovery's decision table, transition by transition, without an engine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from forwarder.docker.containers import (
    Action,
    ContainerTable,
    EmitLifecycle,
    EndReason,
    Follow,
    FollowerEnded,
    Forget,
    Inspect,
    ReportEnd,
    Skip,
    Unwatch,
    Watch,
)
from forwarder.records import ContainerId, ContainerInfo, Position

S = 1_000_000_000
NOW = 1_795_989_450 * S
A = ContainerId("aa" * 32)
B = ContainerId("bb" * 32)
SELF = ContainerId("ee" * 32)


EXCLUDED = {"forwarder.exclude": "true"}


def info(
    cid: str = A,
    *,
    running: bool = True,
    finished_ns: int = 0,
    labels: dict[str, str] | None = None,
) -> ContainerInfo:
    return ContainerInfo(
        id=cid,
        name=f"/c{cid[:2]}",
        running=running,
        finished_at_ns=finished_ns,
        labels=labels or {},
    )


def steps() -> Iterator[float]:
    """Backoff delays that say how many were drawn: 1.0, 2.0, 3.0..."""
    return (float(n) for n in itertools.count(1))


def table(
    *,
    positions: dict[ContainerId, Position] | None = None,
    first_start: bool = False,
    last_run_ns: int | None = None,
    read_from_tail: bool = True,
) -> ContainerTable:
    return ContainerTable(
        positions=dict(positions or {}),
        first_start=first_start,
        last_run_ns=last_run_ns,
        read_from_tail=read_from_tail,
        exclude_label="forwarder.exclude",
        self_id=SELF,
        retry_delays=steps,
    )


def event(action: str, cid: str = A, ts_ns: int = NOW, **attributes: str) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": action,
        "id": cid,
        "Actor": {"ID": cid, "Attributes": {"name": f"c{cid[:2]}", **attributes}},
        "timeNano": ts_ns,
    }


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def listed(t: ContainerTable, *containers: ContainerInfo, first: bool = True) -> list[Action]:
    """List ``containers`` and inspect each one the table asks for."""
    by_id = {c.cid: c for c in containers}
    out: list[Action] = []
    for action in t.on_listed(list(by_id), first=first, now_ns=NOW):
        if isinstance(action, Inspect):
            out += t.on_inspected(action.cid, by_id[action.cid])
        else:
            out.append(action)
    return out


def started(t: ContainerTable, container: ContainerInfo | None, ts_ns: int = NOW) -> list[Action]:
    """A ``start`` event, and the inspection it asks for (None: the container is gone)."""
    cid = container.cid if container is not None else A
    (inspect,) = t.on_event(event("start", cid, ts_ns))
    assert inspect == Inspect(cid, event("start", cid, ts_ns))
    return t.on_inspected(cid, container, inspect.event)


def ended(
    t: ContainerTable,
    reason: EndReason,
    *,
    generation: int = 0,
    position: Position | None = None,
    container: ContainerInfo | None = None,
    error: BaseException | None = None,
) -> list[Action]:
    return t.on_follower_ended(FollowerEnded(A, generation, reason, position, container, error))


# --- listing --------------------------------------------------------------------------------


def test_listed_running_is_followed_from_now_at_the_very_first_start_with_read_from_tail() -> None:
    """From now on is a position like any other: a follower that starts over, and the next
    run, resume there; the listing hands it over to be committed at once."""
    t = table(first_start=True)
    from_now = Position(NOW, 0)
    assert listed(t, info()) == [Watch(info()), Follow(info(), 0, from_now, since_ns=NOW)]
    assert A in t.following
    assert t.positions[A] == from_now
    assert t.listing_done() == {A: from_now}
    assert t.listing_done() == {}
    assert t.listed


def test_listed_running_with_read_from_head_or_not_the_first_start_is_read_whole() -> None:
    assert listed(table(first_start=True, read_from_tail=False), info())[1] == Follow(
        info(), 0, None
    )
    assert listed(table(first_start=False), info())[1] == Follow(info(), 0, None)


def test_listed_with_a_position_resumes_from_it() -> None:
    t = table(first_start=True, positions={A: Position(NOW - S, 2)})
    assert listed(t, info())[1] == Follow(info(), 0, Position(NOW - S, 2))


def test_listed_stopped_is_read_only_if_it_finished_after_the_last_run() -> None:
    before = info(running=False, finished_ns=NOW - 10 * S)
    after = info(B, running=False, finished_ns=NOW - S)
    t = table(last_run_ns=NOW - 5 * S)
    assert listed(t, before, after) == [Watch(after), Follow(after, 0, None)]
    assert A in t.known
    assert A not in t.following
    # The very first start has no horizon: stopped containers are history, not read.
    assert listed(table(first_start=True), before) == []


def test_listed_again_after_a_break_uses_the_last_event_as_the_horizon() -> None:
    t = table(last_run_ns=NOW - 100 * S)
    assert listed(t) == []
    t.on_event(event("create", B, NOW + 5 * S))
    before = info(running=False, finished_ns=NOW + 4 * S)
    after = info(B, running=False, finished_ns=NOW + 6 * S)
    assert listed(t, before, after, first=False) == [Watch(after), Follow(after, 0, None)]


def test_listed_excluded_are_skipped_once_and_not_inspected_again() -> None:
    t = table()
    labelled = info(labels={"forwarder.exclude": "True"})
    own = info(SELF)
    assert listed(t, labelled, own) == [
        Skip(labelled, "label forwarder.exclude=true"),
        Skip(own, "it is forwarder's own container"),
    ]
    assert t.on_listed([A, SELF], first=False, now_ns=NOW) == []


def test_listed_followed_are_not_inspected_again() -> None:
    t = table()
    listed(t, info())
    assert t.on_listed([A, B], first=False, now_ns=NOW) == [Inspect(B)]


def test_listed_gone_before_inspected_is_left_alone() -> None:
    t = table()
    assert t.on_listed([A], first=True, now_ns=NOW) == [Inspect(A)]
    assert t.on_inspected(A, None) == []
    assert not t.following
    assert not t.known


def test_first_listing_forgets_positions_of_containers_that_no_longer_exist() -> None:
    t = table(positions={A: Position(1, 1), B: Position(2, 1)})
    assert t.on_listed([A], first=True, now_ns=NOW) == [Inspect(A), Forget(B)]
    assert B not in t.positions
    # Only at start-up: later listings leave positions to the events.
    t = table(positions={B: Position(2, 1)})
    assert t.on_listed([], first=False, now_ns=NOW) == []


# --- events ---------------------------------------------------------------------------------


def test_start_of_an_unfollowed_container_follows_it_and_reports_it() -> None:
    t = table(first_start=True)
    actions = started(t, info())
    assert kinds(actions) == ["Watch", "Follow", "EmitLifecycle"]
    # Never from "now" for a container started while running: read whole.
    assert actions[1] == Follow(info(), 0, None)
    emit = actions[2]
    assert isinstance(emit, EmitLifecycle)
    assert (emit.ts_ns, emit.record.action, emit.record.container_name) == (NOW, "start", "/caa")


def test_start_of_a_short_lived_container_that_already_exited_reads_it_without_following() -> None:
    t = table()
    actions = started(t, info(running=False))
    assert actions[1] == Follow(info(running=False), 0, None)


def test_start_of_a_followed_container_starts_a_new_generation() -> None:
    t = table()
    listed(t, info())
    assert kinds(started(t, info())) == ["Watch", "EmitLifecycle"]
    assert t.following[A].generation == 1


def test_start_of_a_skipped_container_is_reported_not_followed() -> None:
    t = table()
    t.on_inspected(A, info(), None)  # listed, then its log driver turned out unreadable
    ended(t, EndReason.UNSUPPORTED, error=RuntimeError("501"))
    assert kinds(started(t, info())) == ["EmitLifecycle"]


def test_start_of_a_container_gone_by_inspection_is_reported_from_its_attributes() -> None:
    t = table()
    actions = started(t, None)
    assert kinds(actions) == ["EmitLifecycle"]
    assert not t.following


def test_events_of_excluded_containers_follow_nothing_and_are_not_reported() -> None:
    t = table()
    assert t.on_event(event("start", SELF)) == []
    assert t.on_event(event("die", SELF)) == []
    labelled = info(labels=EXCLUDED)
    (inspect,) = t.on_event(event("start", ts_ns=NOW + 1, **EXCLUDED))
    assert isinstance(inspect, Inspect)
    assert t.on_inspected(A, labelled, inspect.event) == [
        Skip(labelled, "label forwarder.exclude=true")
    ]
    # Known or not, the label in the event's attributes is enough.
    assert t.on_event(event("die", B, NOW + 2, **EXCLUDED)) == [Unwatch(B)]


def test_die_and_destroy_stop_stats_and_destroy_forgets_an_unfollowed_container() -> None:
    t = table(positions={A: Position(1, 1)})
    t.known[A] = info(running=False)
    assert kinds(t.on_event(event("die", ts_ns=NOW + 1))) == ["Unwatch", "EmitLifecycle"]
    assert kinds(t.on_event(event("destroy", ts_ns=NOW + 2))) == [
        "Unwatch",
        "EmitLifecycle",
        "Forget",
    ]
    assert A not in t.known
    assert A not in t.positions


def test_destroy_while_followed_forgets_when_the_follower_ends() -> None:
    t = table()
    listed(t, info())
    assert kinds(t.on_event(event("destroy", ts_ns=NOW + 1))) == ["Unwatch", "EmitLifecycle"]
    assert ended(t, EndReason.GONE, position=Position(5, 1)) == [Forget(A)]
    assert A not in t.following
    assert A not in t.positions


def test_events_without_a_container_id_or_lifecycle_action_emit_nothing() -> None:
    t = table()
    assert t.on_event(event("start", "not-an-id")) == []
    assert t.on_event(event("exec_start", ts_ns=NOW + 1)) == []


def test_replayed_events_are_dropped_and_out_of_order_ones_kept() -> None:
    t = table()
    stream = [event("create", ts_ns=100 * S), event("die", ts_ns=100 * S + 5)]
    stream.append(event("destroy", B, 100 * S + 3))
    assert all(t.on_event(e) for e in stream)
    assert t.last_event_ns == 100 * S + 5
    assert t.events_since() == 99 * S + 5  # a reconnect asks a second earlier
    assert [t.on_event(e) for e in stream] == [[], [], []]


def test_the_first_events_stream_starts_at_the_listing() -> None:
    t = table()
    assert t.events_since() is None
    t.on_listed([], first=True, now_ns=NOW)
    assert t.events_since() == NOW


# --- followers that ended -------------------------------------------------------------------


def test_follower_ended_stopped_lets_the_container_go() -> None:
    t = table()
    listed(t, info())
    stopped = info(running=False)
    assert ended(t, EndReason.STOPPED, position=Position(7, 1), container=stopped) == []
    assert A not in t.following
    assert t.positions[A] == Position(7, 1)
    assert t.known[A] == stopped  # a later start event follows it again
    assert kinds(started(t, info())) == ["Watch", "Follow", "EmitLifecycle"]


def test_follower_ended_while_the_container_still_runs_follows_again_at_once() -> None:
    t = table()
    listed(t, info())
    assert ended(t, EndReason.STOPPED, position=Position(7, 1), container=info()) == [
        Follow(info(), 0, Position(7, 1), new=False)
    ]


def test_follower_ended_after_the_container_restarted_meanwhile_reads_the_new_run() -> None:
    t = table()
    listed(t, info())
    started(t, info())  # generation 1 while the generation-0 follower still reads
    stopped = info(running=False)
    # It saw the container stopped: but it started again meanwhile.
    assert ended(t, EndReason.STOPPED, generation=0, container=stopped) == [
        Follow(stopped, 1, None, new=False)
    ]
    # The follower of generation 1 sees it stopped: that is the end.
    assert ended(t, EndReason.STOPPED, generation=1, container=stopped) == []


def test_follower_ended_gone_is_forgotten_only_once_destroyed() -> None:
    t = table()
    listed(t, info())
    assert ended(t, EndReason.GONE) == []
    assert A in t.known
    assert kinds(t.on_event(event("destroy", ts_ns=NOW + 1))) == [
        "Unwatch",
        "EmitLifecycle",
        "Forget",
    ]


def test_follower_ended_unsupported_is_reported_and_skipped_for_good() -> None:
    t = table()
    listed(t, info())
    error = RuntimeError("501")
    assert ended(t, EndReason.UNSUPPORTED, error=error) == [
        ReportEnd(info(), EndReason.UNSUPPORTED, error)
    ]
    assert A in t.skipped
    assert t.on_listed([A], first=False, now_ns=NOW) == []


def test_follower_broken_restarts_after_a_growing_backoff_from_its_position() -> None:
    t = table()
    listed(t, info())
    error = OSError("reset")
    first = ended(t, EndReason.BROKE, error=error)
    assert first == [
        ReportEnd(info(), EndReason.BROKE, error),
        Follow(info(), 0, None, delay_s=1.0, new=False),
    ]
    assert ended(t, EndReason.CORRUPT, error=error)[1] == Follow(
        info(), 0, None, delay_s=2.0, new=False
    )
    # It got somewhere before it broke again: the backoff starts afresh.
    assert ended(t, EndReason.BROKE, position=Position(9, 1), error=error)[1] == Follow(
        info(), 0, Position(9, 1), delay_s=1.0, new=False
    )


def test_follower_errors_of_ours_are_logged_with_a_traceback_once_per_run_of_errors() -> None:
    t = table()
    listed(t, info())
    bug = RuntimeError("bug")

    def traceback(**kw: Any) -> bool:
        report = ended(t, EndReason.FAILED, error=bug, **kw)[0]
        assert isinstance(report, ReportEnd)
        return report.traceback

    assert [traceback(), traceback(), traceback()] == [True, False, False]
    assert traceback(position=Position(3, 1)) is False  # then a fresh start...
    assert traceback() is True  # ...so the next error shows its traceback again


def test_follower_restarted_after_an_error_keeps_its_tail_start_and_its_generation() -> None:
    t = table(first_start=True)
    listed(t, info())
    started(t, info())  # generation 1
    from_now = Position(NOW, 0)
    restart = ended(t, EndReason.BROKE, generation=0, error=OSError())[1]
    assert restart == Follow(info(), 0, from_now, since_ns=NOW, delay_s=1.0, new=False)
    # Its stream then ends with the container stopped: the newer run is read all the same.
    stopped = info(running=False)
    assert ended(t, EndReason.STOPPED, generation=0, container=stopped) == [
        Follow(stopped, 1, from_now, new=False)
    ]


def test_an_ended_follower_the_table_does_not_know_changes_nothing() -> None:
    t = table()
    assert ended(t, EndReason.STOPPED, container=info()) == []
