"""The chunk buffer: memory while the output keeps up, disk when it stalls, nothing dropped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from forwarder.buffer import ChunkBuffer, open_store
from forwarder.chunks import Chunk, new_chunk_id
from forwarder.records import Position
from forwarder.segments import SegmentStore
from forwarder.tuning import UNRECORDED_RELEASES
from tests.helpers import CID, run, seq_of, until


def chunk(seq: int, size: int = 100) -> Chunk:
    payload = bytes([seq % 256]) * size
    return Chunk.of(new_chunk_id(), "t", payload, 1, {CID: Position(seq, 1)}, seq=seq)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_memory_only_blocks_when_full_and_frees_on_done() -> None:
    async def scenario() -> None:
        buffer = ChunkBuffer(250)
        await buffer.put(chunk(1))
        await buffer.put(chunk(2))
        third = asyncio.create_task(buffer.put(chunk(3)))
        await until(lambda: buffer.waiting_puts == 1, what="the third put to wait for room")
        assert not third.done()
        assert buffer.waiting_puts == 1
        first = await buffer.get()
        await settle()
        assert not third.done()  # a chunk being sent still holds its place
        await buffer.done(first)
        await third
        assert [(await buffer.get()).seq for _ in range(2)] == [2, 3]

    run(scenario())


def test_an_oversized_chunk_enters_an_empty_buffer() -> None:
    async def scenario() -> None:
        buffer = ChunkBuffer(10)
        await buffer.put(chunk(1, size=100))
        assert (await buffer.get()).seq == 1

    run(scenario())


def test_stall_spills_to_disk_and_commits_positions(tmp_path: Path) -> None:
    durable: list[int] = []

    async def scenario() -> None:
        store = open_store(tmp_path, 1 << 20)
        buffer = ChunkBuffer(1 << 20, store=store, on_durable=lambda c: durable.append(seq_of(c)))
        await buffer.open()
        for seq in (1, 2, 3):
            await buffer.put(chunk(seq))
        assert durable == []
        assert buffer.disk_chunks == 0
        in_flight = await buffer.get()
        await buffer.stall(in_flight)  # no server can take it
        assert sorted(durable) == [1, 2, 3]
        await buffer.put(chunk(4))  # while stalled, new chunks go to disk too
        assert durable[-1] == 4
        order = []
        for _ in range(4):
            got = await buffer.get()
            order.append(got.seq if got.seq else got.payload[0])
            await buffer.done(got)
        assert order == [1, 2, 3, 4]  # oldest first
        await buffer.close()
        assert store.live_chunks == 0

    run(scenario())


def test_the_backlog_survives_a_restart(tmp_path: Path) -> None:
    async def first_run() -> None:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await buffer.open()
        for seq in (1, 2):
            await buffer.put(chunk(seq))
        in_flight = await buffer.get()
        await buffer.stall(in_flight)  # the output hands back what it held when cancelled
        await buffer.close()  # stopping with both undelivered

    async def second_run() -> list[bytes]:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        assert await buffer.open() == []
        assert buffer.disk_chunks == 2
        payloads = []
        for _ in range(2):
            got = await buffer.get()
            payloads.append(got.payload)
            await buffer.done(got)
        await buffer.close()
        return payloads

    run(first_run())
    assert run(second_run()) == [bytes([1]) * 100, bytes([2]) * 100]

    async def third_run() -> int:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await buffer.open()
        return buffer.disk_chunks

    assert run(third_run()) == 0  # delivered chunks are not replayed


async def backlog_on_disk(buffer: ChunkBuffer, count: int) -> None:
    await buffer.open()
    for seq in range(1, count + 1):
        await buffer.put(chunk(seq))
    await buffer.stall(await buffer.get())  # no server: all of it goes to disk
    assert buffer.disk_chunks == count


def test_releases_are_written_when_a_backlog_drains_not_with_the_next_append(
    tmp_path: Path,
) -> None:
    """After a backlog drains, no chunk may be appended for hours: the releases must not
    wait for one, or a crash sends the whole backlog again."""

    async def first_run() -> None:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await backlog_on_disk(buffer, 3)
        for _ in range(3):
            await buffer.done(await buffer.get())
        await buffer.wait_recorded()
        # No close: the process is killed here.

    async def after_a_crash() -> int:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await buffer.open()
        return buffer.disk_chunks

    run(first_run())
    assert run(after_a_crash()) == 0


def test_no_chunk_leaves_the_disk_while_too_many_releases_are_unwritten(
    tmp_path: Path,
) -> None:
    """What a crash sends again is bounded: the chunks in flight, plus at most
    UNRECORDED_RELEASES delivered ones whose release is not on disk yet."""

    async def scenario() -> None:
        store = open_store(tmp_path, 1 << 20)
        gate = threading.Event()
        write = store.persist_releases

        def slow_write() -> None:
            gate.wait(5)
            write()

        store.persist_releases = slow_write  # type: ignore[method-assign]
        buffer = ChunkBuffer(1 << 20, store=store)
        await backlog_on_disk(buffer, UNRECORDED_RELEASES + 2)
        for _ in range(UNRECORDED_RELEASES):
            await buffer.done(await buffer.get())
        assert buffer.unrecorded_releases == UNRECORDED_RELEASES
        following = asyncio.create_task(buffer.get())
        await settle()
        assert not following.done()  # the disk is behind: the output waits for it
        gate.set()
        await following
        await buffer.wait_recorded()
        await buffer.close()

    run(scenario())


def test_a_failing_release_write_is_logged_and_holds_nothing_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        store = open_store(tmp_path, 1 << 20)

        def broken() -> None:
            raise OSError("No space left on device")

        store.persist_releases = broken  # type: ignore[method-assign]
        buffer = ChunkBuffer(1 << 20, store=store)
        await backlog_on_disk(buffer, UNRECORDED_RELEASES + 2)
        for _ in range(UNRECORDED_RELEASES + 2):
            await buffer.done(await buffer.get())  # never waits for the broken disk
        await buffer.wait_recorded()
        await buffer.close()  # the close writes the releases after all
        assert store.live_chunks == 0

    run(scenario())
    assert "can't write release records: No space left on device" in caplog.text


def test_always_mode_writes_every_chunk_before_it_is_sent(tmp_path: Path) -> None:
    durable: list[int] = []

    async def scenario() -> None:
        store = open_store(tmp_path, 1 << 20)
        buffer = ChunkBuffer(
            1 << 20, store=store, always_disk=True, on_durable=lambda c: durable.append(seq_of(c))
        )
        await buffer.open()
        await buffer.put(chunk(1))
        assert durable == [1]
        assert store.live_chunks == 1
        got = await buffer.get()
        await buffer.done(got)
        assert store.live_chunks == 0

    run(scenario())


def test_a_full_disk_blocks_until_a_delivery_frees_room(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SegmentStore(tmp_path, max_bytes=2000, segment_bytes=600)
        buffer = ChunkBuffer(1 << 20, store=store, always_disk=True)
        await buffer.open()
        puts = [asyncio.create_task(buffer.put(chunk(seq, size=500))) for seq in range(1, 6)]
        await until(lambda: buffer.waiting_puts == 1, what="a put to wait for room on disk")
        blocked = [p for p in puts if not p.done()]
        assert blocked, "the disk cap was not enforced"
        for _ in puts:  # each delivery frees room for what still waits
            got = await buffer.get()
            await buffer.done(got)
        await asyncio.gather(*puts)
        assert buffer.dropped_chunks == 0

    run(scenario())


def test_drop_oldest_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> ChunkBuffer:
        store = SegmentStore(tmp_path, max_bytes=2000, segment_bytes=600)
        buffer = ChunkBuffer(1 << 20, store=store, always_disk=True, drop_oldest=True)
        await buffer.open()
        for seq in range(1, 8):
            await buffer.put(chunk(seq, size=500))
        return buffer

    buffer = run(scenario())
    assert buffer.dropped_chunks > 0
    assert buffer.dropped_records == buffer.dropped_chunks
    assert caplog.text.count("dropped the oldest chunk") == buffer.dropped_chunks


def test_stall_without_a_disk_keeps_the_chunk_first() -> None:
    async def scenario() -> None:
        buffer = ChunkBuffer(1 << 20)
        await buffer.put(chunk(1))
        await buffer.put(chunk(2))
        first = await buffer.get()
        await buffer.stall(first)
        assert (await buffer.get()).seq == 1

    run(scenario())


def test_wait_safe_returns_once_everything_left_is_on_disk(tmp_path: Path) -> None:
    """What shutdown waits for: everything delivered, or (no server taking chunks) all of
    it durable on disk. Chunks only in memory are at risk, so it keeps waiting for them."""

    async def scenario() -> None:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await buffer.open()
        await buffer.put(chunk(1))
        await buffer.put(chunk(2))
        waiter = asyncio.create_task(buffer.wait_safe())
        await settle()
        assert not waiter.done()  # in memory, and a server may still take them
        await buffer.stall(await buffer.get())  # no server can
        assert await waiter is False
        assert buffer.disk_chunks == 2
        await buffer.put(chunk(3))  # goes to disk while stalled
        assert await buffer.wait_safe() is False
        for _ in range(3):
            got = await buffer.get()
            buffer.recovered()
            await buffer.done(got)
        assert await buffer.wait_safe() is True
        await buffer.close()

    run(scenario())


def test_wait_safe_without_a_disk_waits_for_delivery() -> None:
    async def scenario() -> None:
        buffer = ChunkBuffer(1 << 20)
        await buffer.put(chunk(1))
        await buffer.stall(await buffer.get())
        waiter = asyncio.create_task(buffer.wait_safe())
        await settle()
        assert not waiter.done()  # only in memory: at risk
        got = await buffer.get()
        await buffer.done(got)
        assert await waiter is True

    run(scenario())


def test_a_chunk_from_an_earlier_run_has_no_place_in_sealing_order(tmp_path: Path) -> None:
    """Read back from the last run's disk buffer, a chunk says so (``seq is None``): its
    positions were committed by that run, and the disk keeps no kind."""

    async def first_run() -> None:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await buffer.open()
        await buffer.put(chunk(7))
        await buffer.stall(await buffer.get())
        await buffer.close()

    async def second_run() -> Chunk:
        buffer = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await buffer.open()
        got = await buffer.get()
        await buffer.done(got)
        await buffer.close()
        return got

    run(first_run())
    got = run(second_run())
    assert (got.seq, got.kind, got.stored) == (None, None, True)
    assert got.payload == bytes([7]) * 100
    assert got.positions == {CID: Position(7, 1)}


def test_a_chunk_read_back_in_the_same_run_keeps_its_place(tmp_path: Path) -> None:
    """A chunk whose payload memory could not keep is read back from disk when due: still
    the same chunk, with its seq and kind."""

    async def scenario() -> list[Chunk]:
        buffer = ChunkBuffer(150, store=open_store(tmp_path, 1 << 20), always_disk=True)
        await buffer.open()
        first, second = chunk(1), chunk(2)
        second.kind = "stats"
        await buffer.put(first)
        await buffer.put(second)  # no room in memory beside the first: on disk only
        assert buffer.bytes_held == 100
        got = [await buffer.get(), await buffer.get()]
        await buffer.close()
        return got

    got = run(scenario())
    assert [(c.seq, c.kind, c.payload) for c in got] == [
        (1, None, bytes([1]) * 100),
        (2, "stats", bytes([2]) * 100),
    ]


def test_shutdown_during_a_disk_write_lets_it_finish_and_commit(tmp_path: Path) -> None:
    """A shutdown that comes while a chunk is being written must neither call it all on disk
    too early nor cut the write from its commit: the thread's write can't be called back, so
    a chunk it wrote without its positions committed would be sent twice after a restart."""

    async def scenario() -> None:
        store = open_store(tmp_path, 1 << 20)
        slow, entered, gate = threading.Event(), threading.Event(), threading.Event()
        append = store.append_many

        def slow_append(chunks: Sequence[Chunk]) -> None:
            if slow.is_set():
                entered.set()
                gate.wait(5)
            append(chunks)

        store.append_many = slow_append  # type: ignore[method-assign]
        durable: list[int | None] = []
        buffer = ChunkBuffer(1 << 20, store=store, on_durable=lambda c: durable.append(c.seq))
        await buffer.open()
        await buffer.put(chunk(1))
        await buffer.stall(await buffer.get())  # no server: to disk, written at once
        slow.set()
        putting = asyncio.create_task(buffer.put(chunk(2)))  # to disk while stalled
        await until(entered.is_set, what="chunk 2's write to start")
        safe = asyncio.create_task(buffer.wait_safe())
        await settle()
        assert not safe.done()  # chunk 2 is on its way to disk, not there yet
        closing = asyncio.create_task(buffer.close())
        await settle()
        gate.set()
        assert await closing == 0  # nothing left to spill: the write finished
        assert sorted(s for s in durable if s is not None) == [1, 2]
        putting.cancel()
        safe.cancel()
        reopened = ChunkBuffer(1 << 20, store=open_store(tmp_path, 1 << 20))
        await reopened.open()
        assert reopened.disk_chunks == 2  # each once
        await reopened.close()

    run(scenario())
