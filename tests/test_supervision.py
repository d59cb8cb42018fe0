"""A follower that meets an unexpected error or a corrupt stream: logged once with its
container, and its log read again from the last position taken. No engine: fake sources."""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from forwarder.config import Config
from forwarder.docker.discovery import Discovery
from forwarder.docker.logsource import EngineLogSource, RawBatch
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position, RawLine
from forwarder.timefmt import format_since
from tests.helpers import CID, EndlessSource

S = 1_000_000_000
T0 = 1_795_989_450 * S  # 2026-11-29T21:57:30Z


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def message(n: int) -> bytes:
    """A stdout frame of line ``n``, stamped T0 + n ns."""
    return frame(1, b"2026-11-29T21:57:30.%09dZ line %d\n" % (n, n))


class FakeEngine:
    """``inspect`` says the container has stopped; ``log_bytes`` answers each request with
    the next canned body (as one read), or an empty one when they have run out, recording
    the ``since`` it was asked for."""

    def __init__(self, *bodies: bytes) -> None:
        self.bodies = list(bodies)
        self.since: list[str | None] = []

    async def inspect(self, cid: str) -> ContainerInfo:
        return ContainerInfo(id=cid, name="/web", running=False)

    async def log_bytes(
        self, _cid: str, *, follow: bool, since: str | None = None
    ) -> AsyncIterator[bytes]:
        del follow  # in the real signature; unused here
        self.since.append(since)
        yield self.bodies.pop(0) if self.bodies else b""


def make_discovery(engine: Any, source: Any, got: list[LogLine]) -> Discovery:
    async def sink(_container: ContainerInfo, lines: list[LogLine], _position: Position) -> None:
        got.extend(lines)

    def no_wait() -> Iterator[float]:
        return itertools.repeat(0.0)

    return Discovery(
        config=Config(),
        engine=engine,
        source=source,
        sink=sink,
        positions={},
        first_start=False,
        last_run_ns=None,
        retry_delays=no_wait,
    )


async def follow(discovery: Discovery) -> None:
    """Follow the container (running) until no follower reads it any more."""
    await discovery._perform(
        discovery.table.follow(ContainerInfo(id=CID, name="/web", running=True))
    )
    async with asyncio.timeout(10):
        while (task := discovery.followers.get(CID)) is not None:
            await asyncio.wait({task})


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


def test_a_corrupt_frame_names_container_and_offset_and_the_stream_is_read_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = message(1) + message(2)
    # A flipped bit in the third frame's header: stream byte 0x01 became 0x41.
    corrupt = good + b"\x41" + message(3)[1:] + message(4)
    # The engine's since is inclusive: asked again from line 2, it sends line 2 again. Both
    # are catch-up reads (without follow); the follow request after the second finds no more.
    engine = FakeEngine(corrupt, message(2) + message(3) + message(4))
    got: list[LogLine] = []
    discovery = make_discovery(engine, EngineLogSource(engine), got)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="forwarder.docker"):
        asyncio.run(follow(discovery))
    # The good lines read before the corruption were taken, and nothing twice.
    assert texts(got) == ["line 1", "line 2", "line 3", "line 4"]
    assert engine.since == [None, format_since(T0 + 2), format_since(T0 + 4)]
    assert discovery.positions[CID] == Position(T0 + 4, 1)
    reports = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(reports) == 1
    assert reports[0].levelno == logging.WARNING
    text = reports[0].getMessage()
    assert text.startswith("container /web: corrupt log stream (bad frame header at stream ")
    assert f"offset {len(good)}:" in text


class FailingSource:
    """A log source whose first read yields a batch and then raises an error of ours; every
    later read gives the lines from the engine's inclusive ``since`` on."""

    def __init__(self, lines: list[RawLine], error: Exception) -> None:
        self.lines = lines
        self.error: Exception | None = error
        self.since: list[str | None] = []

    async def read(
        self,
        _container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None = None,
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[RawBatch]:
        del follow, position, stopped  # in the real signature; unused here
        self.since.append(since)
        if self.error is not None:
            error, self.error = self.error, None
            yield RawBatch(self.lines[:2])
            raise error
        seconds, ns = (int(x) for x in (since or "0.0").split("."))
        yield RawBatch([line for line in self.lines if line.ts_ns >= seconds * S + ns])


def test_a_follower_that_raises_is_logged_with_its_container_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = [RawLine("stdout", T0 + n, b"line %d" % n, False) for n in range(1, 5)]
    source = FailingSource(lines, RuntimeError("bug in the parser"))
    got: list[LogLine] = []
    discovery = make_discovery(FakeEngine(), source, got)
    with caplog.at_level(logging.INFO, logger="forwarder.docker"):
        asyncio.run(follow(discovery))
    assert texts(got) == ["line 1", "line 2", "line 3", "line 4"]
    # Restarted from the position the first read reached.
    assert source.since == [None, format_since(T0 + 2)]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    text = errors[0].getMessage()
    assert text.startswith("container /web: following its log failed (RuntimeError: bug in ")
    assert errors[0].exc_info is not None  # with its traceback, once


class FlakyListing(FakeEngine):
    """Listing fails once with an error of ours; then one running container, and an events
    stream that stays open."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    async def list_container_ids(self, *, all: bool = False) -> list[ContainerId]:
        del all  # in the real signature; unused here
        self.listings += 1
        if self.listings == 1:
            raise KeyError("Id")
        return [CID]

    async def inspect(self, cid: str) -> ContainerInfo:
        return ContainerInfo(id=cid, name="/web", running=True)

    async def events(self, *, since_ns: int | None) -> AsyncIterator[dict[str, Any]]:
        del since_ns  # in the real signature; unused here
        await asyncio.Event().wait()
        yield {}


def test_discovery_that_raises_is_logged_and_lists_again(caplog: pytest.LogCaptureFixture) -> None:
    engine = FlakyListing()
    discovery = make_discovery(engine, EndlessSource(), [])

    async def main() -> None:
        followed = asyncio.Event()
        discovery.on_container = lambda _container: followed.set()
        task = asyncio.create_task(discovery.run())
        async with asyncio.timeout(10):
            await followed.wait()
        assert engine.listings == 2
        assert CID in discovery.followers
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="forwarder.docker"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "discovery failed (KeyError: 'Id'); listing containers again with backoff"
    ]
    assert not discovery.followers  # stopped with discovery
