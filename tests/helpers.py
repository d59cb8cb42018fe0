"""Helpers the unit tests share: one of each, so that every test file means the same by them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal, TypeVar

import uvloop

from forwarder.chunks import Chunk
from forwarder.docker.logsource import RawBatch
from forwarder.records import ContainerId, ContainerInfo, Position

T = TypeVar("T")

CID = ContainerId("c" * 64)
"""A container id, as the engine writes them: 64 hex digits."""

DEADLINE_S = 10.0
"""How long any one test's event loop may run: a hang fails the test instead of the run."""


def run(
    coro: Coroutine[Any, Any, T],
    *,
    loop: Literal["asyncio", "uvloop"] = "asyncio",
    deadline_s: float = DEADLINE_S,
) -> T:
    """Run ``coro`` to its end on a new event loop (the stock one, or uvloop as ``forwarder
    run`` uses), failing with ``TimeoutError`` after ``deadline_s``."""

    async def bounded() -> T:
        async with asyncio.timeout(deadline_s):
            return await coro

    return uvloop.run(bounded()) if loop == "uvloop" else asyncio.run(bounded())


async def until(done: Callable[[], bool], *, what: str, timeout_s: float = DEADLINE_S) -> None:
    """Poll ``done()`` on the running loop until it holds; ``AssertionError`` naming ``what``
    at the deadline. Each poll yields to the loop, and to threads the loop waits on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.001)


def seq_of(chunk: Chunk) -> int:
    """A chunk's place in sealing order: every chunk a unit test seals has one."""
    assert chunk.seq is not None
    return chunk.seq


def feed_all(feed: Callable[[bytes], object], *pieces: bytes) -> None:
    """Pass ``pieces`` to ``feed`` in order: under ``pytest.raises``, the error may come from
    whichever piece completes what is wrong."""
    for piece in pieces:
        feed(piece)


class EndlessSource:
    """A log source whose stream stays open and says nothing."""

    async def read(
        self,
        _container: ContainerInfo,
        *,
        since: str | None,
        follow: bool,
        position: Position | None = None,
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[RawBatch]:
        del since, follow, position, stopped  # in the real signature; unused here
        await asyncio.Event().wait()
        yield RawBatch([])


def log_view(records: list[Any], cid: str) -> list[tuple[Any, ...]]:
    """A container's log records as comparable tuples (tag, time, sorted items), sorted:
    what the fluentd-driver comparisons hold forwarder's records against."""
    return sorted(
        (r["tag"], r["time_ns"], tuple(sorted(r["record"].items())))
        for r in records
        if r["record"].get("container_id") == cid and "log" in r["record"]
    )
