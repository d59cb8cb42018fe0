"""Discovery's events: out-of-order and replayed ones, the hooks the stats poller uses, and the
lifecycle records handed to their sink."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from forwarder.config import Config
from forwarder.docker.discovery import Discovery
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position
from tests.helpers import CID, EndlessSource


def event(action: str, ts_ns: int = 1, cid: str = CID) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": action,
        "status": action,
        "id": cid,
        "Actor": {"ID": cid, "Attributes": {"name": "web", "image": "img"}},
        "timeNano": ts_ns,
    }


class FakeEngine:
    def __init__(self) -> None:
        self.running = True

    async def inspect(self, cid: str) -> ContainerInfo:
        return ContainerInfo(id=cid, name="/web", image="img", running=self.running)


async def no_lines(container: ContainerInfo, lines: list[LogLine], position: Position) -> None:
    pass


def make_discovery(**hooks: Any) -> Discovery:
    return Discovery(
        config=Config(),
        engine=FakeEngine(),  # type: ignore[arg-type]
        source=EndlessSource(),
        sink=no_lines,
        positions={},
        first_start=False,
        last_run_ns=None,
        **hooks,
    )


S = 1_000_000_000


def test_events_out_of_time_order_are_fresh_and_replays_are_not() -> None:
    discovery = make_discovery()
    other = "cd" * 32
    # The engine stamps events before it queues them: under load a later one overtakes.
    stream = [event("create", 100 * S), event("start", 100 * S + 5), event("die", 100 * S + 3)]
    stream.append(event("create", 100 * S + 4, cid=other))
    assert [discovery.table.on_event(e) != [] for e in stream] == [True] * 4
    assert discovery.table.last_event_ns == 100 * S + 5
    # A reconnect asks again from a second before the newest event: what came is dropped,
    # what is new (even older than the newest seen) is kept.
    replay = [*stream, event("start", 100 * S + 1, cid=other), event("destroy", 101 * S)]
    assert [discovery.table.on_event(e) != [] for e in replay] == [False] * 4 + [True, True]


def test_seen_events_are_forgotten_once_out_of_the_replay_window() -> None:
    discovery = make_discovery()
    for n in range(1000):
        assert discovery.table._fresh(event("start", n * S // 10, cid=f"{n:064x}"))
    # 100 s of events, one every 0.1 s: only the last 2 s are kept.
    assert len(discovery.table._seen) <= 21


def test_hooks_follow_the_containers_runs() -> None:
    async def main() -> None:
        calls: list[tuple[str, Any]] = []
        events: list[str] = []

        async def lifecycle_sink(tag: str, records: list[tuple[int, dict[str, object]]]) -> None:
            events.extend(f"{tag} {record['action']}" for _, record in records)

        discovery = make_discovery(
            lifecycle_sink=lifecycle_sink,
            on_container=lambda c: calls.append(("container", c.id)),
            on_stopped=lambda cid: calls.append(("stopped", cid)),
        )
        stamps = itertools.count(1)

        async def handle(event: dict[str, Any]) -> None:
            event["timeNano"] = next(stamps)  # each one fresh, none a replay
            await discovery._perform(discovery.table.on_event(event))

        await handle(event("create"))
        assert calls == []
        await handle(event("start"))  # followed: the hook sees it
        assert calls == [("container", CID)]
        assert ContainerId(CID) in discovery.followers
        await handle(event("die"))
        await handle(event("start"))  # started again, its follower still there
        await handle(event("kill"))
        await handle(event("die"))
        await handle(event("destroy"))
        assert calls == [
            ("container", CID),
            ("stopped", CID),
            ("container", CID),
            ("stopped", CID),
            ("stopped", CID),
        ]
        actions = ["create", "start", "die", "start", "kill", "die", "destroy"]
        assert events == [f"docker.events.web {action}" for action in actions]
        await discovery.stop_followers()

    asyncio.run(main())
