"""The chunk assembler: a batch bigger than a chunk is cut into parts, each with the position
it reaches, and the chunks are registered in the order they were sealed."""

from __future__ import annotations

import asyncio
import contextlib

from forwarder.assembler import ENTRY_OVERHEAD_BYTES, ChunkAssembler, split_batch
from forwarder.buffer import ChunkBuffer
from forwarder.checkpoint import PositionTracker
from forwarder.config import config_from_dict
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position
from tests.helpers import CID, run, until

CONTAINER = ContainerInfo(id=CID, name="/web")
# What a line of n characters counts for in the split's estimate.
PER_LINE = ENTRY_OVERHEAD_BYTES + len(CONTAINER.id) + len(CONTAINER.name)


def lines(*stamps: int, size: int = 10) -> list[LogLine]:
    return [LogLine("stdout", ts, f"{i:0{size}d}") for i, ts in enumerate(stamps)]


def cost(part: list[LogLine]) -> int:
    return sum(PER_LINE + len(line.text) for line in part)


def test_a_batch_that_fits_is_one_part_with_the_batch_position() -> None:
    batch = lines(1, 2, 3)
    position = Position(3, 1)
    assert split_batch(CONTAINER, batch, position, cost(batch)) == [(batch, position)]


def test_a_batch_one_byte_over_the_limit_is_cut_in_two() -> None:
    batch = lines(1, 2, 3)
    parts = split_batch(CONTAINER, batch, Position(3, 1), cost(batch) - 1)
    assert parts == [(batch[:2], Position(2, 1)), (batch[2:], Position(3, 1))]


def test_a_part_may_fill_the_limit_exactly() -> None:
    batch = lines(1, 2, 3, 4, 5)
    limit = cost(batch[:2])  # two lines fill a part to the byte; the third starts the next
    parts = split_batch(CONTAINER, batch, Position(5, 1), limit)
    assert [part for part, _ in parts] == [batch[0:2], batch[2:4], batch[4:]]
    assert [position for _, position in parts] == [Position(2, 1), Position(4, 1), Position(5, 1)]
    assert all(cost(part) <= limit for part, _ in parts)


def test_every_line_lands_in_exactly_one_part_in_order() -> None:
    batch = lines(*range(1, 101), size=37)
    limit = 1000
    parts = split_batch(CONTAINER, batch, Position(100, 1), limit)
    assert len(parts) > 1
    assert [line for part, _ in parts for line in part] == batch
    assert all(part and cost(part) <= limit for part, _ in parts)


def test_the_last_part_carries_the_batch_position_and_inner_parts_their_own() -> None:
    """The batch's position counts lines the follower took before this batch at the same
    nanosecond; only the last part may carry it. An inner part's count at its last
    nanosecond counts only its own lines, so a resume from it repeats a line, never skips."""
    batch = lines(7, 7, 7, 7, 9)
    given = Position(9, 1)
    parts = split_batch(CONTAINER, batch, given, cost(batch[:2]))
    # The second part's position is (7, 2), its own two lines, not (7, 4).
    assert parts == [(batch[0:2], Position(7, 2)), (batch[2:4], Position(7, 2)), (batch[4:], given)]


def test_a_line_bigger_than_the_limit_is_a_part_of_its_own() -> None:
    batch = [*lines(1, 2), LogLine("stdout", 3, "x" * 500), *lines(4)]
    parts = split_batch(CONTAINER, batch, Position(4, 1), 300)
    assert [part for part, _ in parts] == [batch[0:2], batch[2:3], batch[3:]]
    assert [position for _, position in parts] == [Position(2, 1), Position(3, 1), Position(4, 1)]


def test_a_big_batch_is_sealed_into_chunks_that_commit_in_order() -> None:
    """Through the assembler: each part's position rides its own chunk, and as the chunks
    are delivered in sealing order the committed position walks the batch to its end."""
    config = config_from_dict(
        {"output": {"servers": ["tcp://127.0.0.1:24224"], "chunk_limit": "1KiB"}}, env={}
    )
    batch = lines(*range(1, 41), size=30)
    limit = config.output.chunk_limit
    parts = split_batch(CONTAINER, batch, Position(40, 1), limit)

    async def scenario() -> list[Position | None]:
        tracker = PositionTracker()
        buffer = ChunkBuffer(1 << 20)
        assembler = ChunkAssembler(config, buffer, tracker)
        await assembler.add_lines(CONTAINER, batch, Position(40, 1))
        await assembler.flush()
        committed = []
        while buffer.queued:
            chunk = await buffer.get()
            assert chunk.seq is not None
            tracker.delivered(chunk.seq)
            await buffer.done(chunk)
            committed.append(tracker.committed.get(CID))
        assert assembler.records_in["log"] == len(batch)
        return committed

    assert len(parts) > 2
    assert run(scenario()) == [position for _, position in parts]


def test_a_sealed_chunk_reaches_the_buffer_though_its_put_was_cancelled() -> None:
    """At shutdown the followers and the flusher are cancelled, maybe in the middle of a put:
    the sealed chunk is out of the chunker by then, so it must still reach the buffer (or its
    position is never committed and the next start reads its lines again)."""
    config = config_from_dict({"output": {"servers": ["tcp://127.0.0.1:24224"]}}, env={})

    async def scenario() -> None:
        tracker = PositionTracker()
        buffer = ChunkBuffer(1)  # one chunk at a time: the next put waits for room
        assembler = ChunkAssembler(config, buffer, tracker)
        await assembler.add_lines(CONTAINER, lines(1, 2, 3), Position(3, 1))
        await assembler.flush()
        await assembler.add_lines(CONTAINER, lines(4, 5, 6), Position(6, 1))
        blocked = asyncio.create_task(assembler.flush())
        await until(lambda: buffer.waiting_puts == 1, what="the put to wait for room")
        blocked.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await blocked
        first = await buffer.get()  # the output takes the first chunk: room again
        flushing = asyncio.create_task(assembler.flush())
        await buffer.done(first)
        await flushing
        assert first.seq is not None
        tracker.delivered(first.seq)
        seqs = []
        while buffer.queued:
            chunk = await buffer.get()
            assert chunk.seq is not None
            seqs.append(chunk.seq)
            tracker.delivered(chunk.seq)
            await buffer.done(chunk)
        assert seqs  # what the cancelled put carried is in the buffer after all
        assert tracker.committed[ContainerId(CID)] == Position(6, 1)

    run(scenario())
