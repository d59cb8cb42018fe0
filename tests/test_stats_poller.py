"""StatsPoller: which way it samples, what it ships, and that its tasks end."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.docker.engine import ContainerGoneError, EngineUnavailableError
from forwarder.docker.stats import read_time
from forwarder.docker.stats_poller import StatsMode, StatsPoller, stream_every
from forwarder.records import ContainerId, ContainerInfo, StatsEvent
from forwarder.tags import compile_template

DATA = Path(__file__).parent / "data" / "stats"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


BUSY = load("v1_busy_oneshot.json")
CID = BUSY[0]["id"]
CONTAINER = ContainerInfo(id=CID, name="/busy", image="busybox", running=True)


def stopped_sample() -> dict[str, Any]:
    sample: dict[str, Any] = copy.deepcopy(load("v1_stopped.json"))
    sample["id"] = CID
    return sample


class FakeEngine:
    """Hands out the given samples (or exceptions) in order; then waits forever."""

    def __init__(self, items: list[dict[str, Any] | Exception]) -> None:
        self.items = list(items)
        self.calls: list[str] = []

    async def _next(self) -> dict[str, Any]:
        if not self.items:
            await asyncio.Event().wait()
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def stats_once(self, _cid: str) -> dict[str, Any]:
        self.calls.append("once")
        return await self._next()

    async def stats_stream(
        self, _cid: str, *, stream: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        del stream  # in the real signature; unused here
        self.calls.append("stream")
        while True:
            yield await self._next()


Records = list[tuple[str, int, dict[str, Any]]]


def make_poller(
    engine: FakeEngine, interval_s: float, sink: Callable[..., Awaitable[None]] | None = None
) -> tuple[StatsPoller, Records]:
    got: Records = []

    async def collect(tag: str, records: list[tuple[int, dict[str, Any]]]) -> None:
        got.extend((tag, ts, record) for ts, record in records)

    poller = StatsPoller(
        engine,
        interval_s=interval_s,
        tag=compile_template("docker.stats.{{.Name}}"),
        sink=sink or collect,
    )
    return poller, got


async def ended(poller: StatsPoller) -> None:
    """Wait (5 s at most) until every task the poller has now has ended."""
    async with asyncio.timeout(5):
        await asyncio.gather(*poller.tasks.values())
    assert len(poller) == 0


@pytest.mark.parametrize(
    ("interval_s", "mode", "every"),
    [
        (0.5, StatsMode.STREAM, 1),
        (1.0, StatsMode.STREAM, 1),
        (1.4, StatsMode.STREAM, 1),
        (1.5, StatsMode.STREAM, 2),
        (1.99, StatsMode.STREAM, 2),
        (2.0, StatsMode.ONESHOT, 2),
        (10.0, StatsMode.ONESHOT, 10),
    ],
)
def test_mode_by_interval(interval_s: float, mode: StatsMode, every: int) -> None:
    assert StatsMode.for_interval(interval_s) is mode
    assert stream_every(interval_s) == every
    poller, _ = make_poller(FakeEngine([]), interval_s)
    assert poller.mode is mode


def test_zero_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval must be positive"):
        make_poller(FakeEngine([]), 0)


def test_oneshot_ships_each_poll_and_ends_when_the_container_stops() -> None:
    async def main() -> None:
        engine = FakeEngine([BUSY[0], BUSY[1], stopped_sample()])
        poller, got = make_poller(engine, 2.0)
        poller.interval_s = 0.01  # the mode stays one-shot; the test need not wait 2 s
        poller.start(CONTAINER)
        assert len(poller) == 1
        await ended(poller)
        assert engine.calls == ["once"] * 3
        assert [tag for tag, _, _ in got] == ["docker.stats.busy"] * 2
        times = [read_time(s) for s in BUSY]
        assert [ts for _, ts, _ in got] == [t.ns for t in times if t is not None]
        first, second = (StatsEvent.model_validate(r) for _, _, r in got)
        assert first.cpu_percent is None  # one-shot: nothing to compare with yet
        assert second.cpu_percent is not None
        assert second.cpu_percent > 50
        assert poller.records_out == 2

    asyncio.run(main())


def test_stream_ships_every_nth_sample_and_ends_on_the_stopped_sample() -> None:
    async def main() -> None:
        samples = load("v1_busy_stream.json")
        engine = FakeEngine([samples[0], samples[1], samples[0], samples[1], stopped_sample()])
        poller, got = make_poller(engine, 1.5)  # every 2nd sample
        poller.start(CONTAINER)
        await ended(poller)
        assert engine.calls == ["stream"]
        assert len(got) == 2
        assert [ts for _, ts, _ in got] == [read_time(samples[0]).ns] * 2  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_removed_container_ends_its_task() -> None:
    async def main() -> None:
        poller, got = make_poller(FakeEngine([ContainerGoneError("404")]), 10.0)
        poller.start(CONTAINER)
        await ended(poller)
        assert got == []

    asyncio.run(main())


def test_engine_errors_are_retried() -> None:
    async def main() -> None:
        engine = FakeEngine([EngineUnavailableError("down"), BUSY[0], stopped_sample()])
        poller, got = make_poller(engine, 10.0)
        poller.interval_s = 0.01
        poller.start(CONTAINER)
        await ended(poller)
        assert engine.calls == ["once"] * 3
        assert len(got) == 1

    asyncio.run(main())


def test_a_stopped_container_is_not_sampled() -> None:
    async def main() -> None:
        poller, _ = make_poller(FakeEngine([]), 10.0)
        poller.start(CONTAINER.model_copy(update={"running": False}))
        assert len(poller) == 0

    asyncio.run(main())


def test_stop_ends_the_task_and_start_twice_makes_one() -> None:
    async def main() -> None:
        shipped = asyncio.Event()

        async def sink(_tag: str, _records: list[tuple[int, dict[str, Any]]]) -> None:
            shipped.set()

        engine = FakeEngine([BUSY[0]])  # then the next request hangs, as a slow engine's
        poller, _ = make_poller(engine, 0.01, sink=sink)
        poller.start(CONTAINER)
        poller.start(CONTAINER)
        assert len(poller) == 1
        task = poller.tasks[ContainerId(CID)]
        async with asyncio.timeout(5):
            await shipped.wait()
        poller.stop(ContainerId(CID))
        assert len(poller) == 0
        await asyncio.wait([task], timeout=5)
        assert task.done()
        poller.stop(ContainerId(CID))  # again: nothing to do

    asyncio.run(main())


def test_a_stop_during_a_blocked_delivery_still_delivers() -> None:
    async def main() -> None:
        entered, room = asyncio.Event(), asyncio.Event()
        got: list[str] = []

        async def full_buffer(tag: str, _records: list[tuple[int, dict[str, Any]]]) -> None:
            entered.set()
            await room.wait()
            got.append(tag)

        poller, _ = make_poller(FakeEngine([BUSY[0]]), 10.0, sink=full_buffer)
        poller.start(CONTAINER)
        task = poller.tasks[ContainerId(CID)]
        async with asyncio.timeout(5):
            await entered.wait()
        poller.stop(ContainerId(CID))
        await asyncio.wait([task], timeout=5)
        assert task.done()
        assert got == []
        room.set()
        await poller.aclose()
        assert got == ["docker.stats.busy"]

    asyncio.run(main())


def test_aclose_ends_every_task() -> None:
    async def main() -> None:
        poller, _ = make_poller(FakeEngine([]), 1.0)
        others = [
            CONTAINER.model_copy(update={"id": f"{n:064x}", "name": f"/c{n}"}) for n in range(5)
        ]
        for container in others:
            poller.start(container)
        tasks = list(poller.tasks.values())
        assert len(tasks) == 5
        await poller.aclose()
        assert len(poller) == 0
        assert all(t.done() for t in tasks)

    asyncio.run(main())


def test_an_unexpected_error_is_logged_with_its_container_and_sampling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        engine = FakeEngine([RuntimeError("bad sample"), BUSY[0], stopped_sample()])
        poller, got = make_poller(engine, 10.0)
        poller.retry_delays = lambda: itertools.repeat(0.0)
        poller.interval_s = 0.01
        poller.start(CONTAINER)
        await ended(poller)
        assert engine.calls == ["once"] * 3
        assert len(got) == 1

    with caplog.at_level(logging.INFO, logger="forwarder.docker"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "container /busy: stats failed (RuntimeError: bad sample); sampling again with backoff"
    ]
    assert errors[0].exc_info is not None
