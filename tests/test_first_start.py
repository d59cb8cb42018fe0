"""A first start is one from a state that never reached the engine, not one without a file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.checkpoint import PositionStore, SavedState
from forwarder.config import Config
from forwarder.docker.discovery import Discovery
from forwarder.docker.engine import EngineUnavailableError
from forwarder.docker.frames import LogLine
from forwarder.docker.logsource import RawBatch
from forwarder.pipeline import Pipeline
from forwarder.records import ContainerId, ContainerInfo, Position

CID = ContainerId("ab" * 32)
NOW = 1_800_000_000_000_000_000


class FakeEngine:
    def __init__(self, reachable: bool = True) -> None:
        self.reachable = reachable

    async def list_container_ids(self, *, all: bool) -> list[str]:
        del all  # the engine's signature; this engine lists everything it has
        if not self.reachable:
            raise EngineUnavailableError("no such socket")
        return [CID]

    async def inspect(self, cid: str) -> ContainerInfo:
        return ContainerInfo(id=cid, name="/web", running=True)


class RecordingSource:
    """A log stream that stays open and says nothing; remembers where it was asked from."""

    def __init__(self) -> None:
        self.since: list[str | None] = []

    async def read(
        self,
        container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None = None,
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[RawBatch]:
        del (
            container,
            follow,
            position,
            stopped,
        )  # LogSource's signature; only where it was asked from counts
        self.since.append(since)
        await asyncio.Event().wait()
        yield RawBatch([])


async def no_lines(container: ContainerInfo, lines: list[LogLine], position: Position) -> None:
    pass


async def yield_until(done: Callable[[], object]) -> None:
    """Let the other tasks run until ``done()`` (a few loop turns; no wall-clock wait)."""
    for _ in range(100):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def make_discovery(source: RecordingSource, engine: FakeEngine, **kw: Any) -> Discovery:
    return Discovery(
        config=Config.model_validate({"docker": {"read_from": "tail"}}),
        engine=engine,  # type: ignore[arg-type]
        source=source,
        sink=no_lines,
        positions={},
        clock_ns=lambda: NOW,
        **kw,
    )


def test_tail_on_a_first_start_is_a_position_handed_out_at_the_listing() -> None:
    async def main() -> None:
        source = RecordingSource()
        listed: list[dict[ContainerId, Position]] = []
        engine = FakeEngine(reachable=False)
        discovery = make_discovery(
            source, engine, first_start=True, last_run_ns=None, on_listed=listed.append
        )
        with pytest.raises(EngineUnavailableError):
            await discovery._sync(True)
        assert discovery.watched_ns is None  # it never saw the engine
        assert listed == []
        engine.reachable = True
        await discovery._sync(True)
        assert listed == [{CID: Position(NOW, 0)}]
        assert discovery.positions == {CID: Position(NOW, 0)}
        assert discovery.watched_ns == NOW
        await yield_until(lambda: source.since)
        assert source.since == ["1800000000.000000000"]
        await discovery.stop_followers()

    asyncio.run(main())


def test_a_restart_reads_a_container_without_position_from_the_head() -> None:
    async def main() -> None:
        source = RecordingSource()
        listed: list[dict[ContainerId, Position]] = []
        discovery = make_discovery(
            source, FakeEngine(), first_start=False, last_run_ns=NOW - 1, on_listed=listed.append
        )
        await discovery._sync(True)
        assert listed == [{}]
        await yield_until(lambda: source.since)
        assert source.since == [None]
        await discovery.stop_followers()

    asyncio.run(main())


def pipeline_config(state: Path, host: str) -> Config:
    return Config.model_validate(
        {
            "docker": {"host": host, "read_from": "tail"},
            "output": {"mode": "stdout"},
            "state": {"dir": str(state)},
            "stats": {"interval": "0s"},
        }
    )


def test_a_run_that_never_reached_the_engine_leaves_the_next_a_first_start(
    tmp_path: Path,
) -> None:
    """Its positions file exists afterwards, yet says that no run ever saw the engine."""

    async def run_once() -> None:
        pipeline = Pipeline(pipeline_config(tmp_path, f"unix://{tmp_path}/nothing.sock"))
        assert pipeline.first_start
        await pipeline.start()
        await yield_until(lambda: pipeline.checkpointer.saves)
        await pipeline.shutdown(1.0)

    asyncio.run(run_once())
    assert (tmp_path / "positions.json").exists()
    assert Pipeline(pipeline_config(tmp_path, f"unix://{tmp_path}/nothing.sock")).first_start


def test_a_run_that_never_reached_the_engine_keeps_the_last_horizon(tmp_path: Path) -> None:
    """The stopped-containers catch-up starts where the last run that saw the engine left
    off, not where a run that never saw it saved its file."""
    PositionStore(tmp_path).save({CID: Position(5, 1)}, now_ns=NOW, engine_seen_ns=NOW - 7)

    async def run_once() -> None:
        pipeline = Pipeline(pipeline_config(tmp_path, f"unix://{tmp_path}/nothing.sock"))
        assert not pipeline.first_start
        await pipeline.start()
        await pipeline.shutdown(1.0)

    asyncio.run(run_once())
    assert PositionStore(tmp_path).load() == SavedState({CID: Position(5, 1)}, NOW - 7)
