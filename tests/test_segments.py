"""The on-disk chunk store: round trips, releases, recovery from damage, limits, fsyncs."""

from __future__ import annotations

import errno
import os
import queue
import random
import stat
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from forwarder.chunks import Chunk, ChunkId
from forwarder.records import ContainerId, Position
from forwarder.segments import (
    HEADER_BYTES,
    MAGIC,
    BufferFullError,
    CorruptChunkError,
    Damage,
    SegmentStore,
)
from tests.helpers import CID

BIG = 1 << 30


def chunk(i: int, size: int = 200) -> Chunk:
    payload = random.Random(i).randbytes(size)
    assert MAGIC not in payload  # keeps the damage tests' expectations exact
    return Chunk.of(
        ChunkId(f"chunk-{i:04d}"),
        "docker.web",
        payload,
        i + 1,
        {CID: Position(1_000 + i, 1), ContainerId(f"{i:064x}"): Position(7, i)},
    )


def stored(c: Chunk) -> Chunk:
    """``c`` as the store gives it back: marked stored, its payload loaded."""
    return replace(c, stored=True)


def meta_of(c: Chunk) -> Chunk:
    """``c`` as recovery gives it back: marked stored, its payload not loaded."""
    return stored(c).without_payload()


def open_store(
    directory: Path, *, max_bytes: int = BIG, **kwargs: int | bool
) -> tuple[SegmentStore, list[Chunk], list[Damage]]:
    store = SegmentStore(directory, max_bytes=max_bytes, **kwargs)  # type: ignore[arg-type]
    metas, damage = store.recover()
    return store, metas, damage


def ids(metas: list[Chunk]) -> list[str]:
    return [m.chunk_id for m in metas]


def names(n: list[int]) -> list[str]:
    return [f"chunk-{i:04d}" for i in n]


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("seg-*.fwd"))


def assert_accounts(store: SegmentStore, directory: Path) -> None:
    assert store.bytes_used == sum(p.stat().st_size for p in directory.glob("seg-*.fwd"))


def record_size(c: Chunk) -> int:
    meta = msgpack.packb({"id": c.chunk_id, "tag": c.tag, "count": c.count, "pos": c.positions})
    return HEADER_BYTES + len(meta) + len(c.payload)


def write_segment(directory: Path, chunks: list[Chunk]) -> tuple[Path, list[int]]:
    """One segment holding ``chunks``; returns its path and each record's start offset."""
    store, _, _ = open_store(directory, fsync=False)
    starts = []
    for c in chunks:
        starts.append(store.bytes_used)
        store.append(c)
    store.close()
    (path,) = directory.glob("seg-*.fwd")
    assert path.read_bytes().count(MAGIC) == len(chunks)
    return path, starts


def recover_bytes(directory: Path, data: bytes) -> tuple[list[Chunk], list[Damage], Path]:
    directory.mkdir()
    path = directory / "seg-000000000001.fwd"
    path.write_bytes(data)
    store, metas, damage = open_store(directory, fsync=False)
    store.close()
    return metas, damage, path


# --- round trips and order ------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    store, metas, damage = open_store(tmp_path)
    assert (metas, damage) == ([], [])
    store.append(chunk(0))
    store.append(chunk(1, size=5000))
    assert store.read(ChunkId("chunk-0000")) == stored(chunk(0))
    assert store.read(ChunkId("chunk-0001")) == stored(chunk(1, size=5000))
    assert store.live_chunks == 2
    assert_accounts(store, tmp_path)
    store.close()

    store, metas, damage = open_store(tmp_path)
    assert metas == [meta_of(chunk(0)), meta_of(chunk(1, size=5000))]
    assert damage == []
    assert store.read(ChunkId("chunk-0001")) == stored(chunk(1, size=5000))
    store.close()


def test_replay_order_across_segments(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path, segment_bytes=1000)
    order = [5, 3, 9, 0, 7, 1, 8, 2, 6, 4, 11, 10]
    for i in order[:4]:
        store.append(chunk(i))
    store.append_many([chunk(i) for i in order[4:]])
    store.close()
    assert len(segment_files(tmp_path)) >= 4

    store, metas, damage = open_store(tmp_path, segment_bytes=1000)
    assert ids(metas) == names(order)
    assert damage == []
    store.close()


def test_layout_matches_the_documented_format(tmp_path: Path) -> None:
    """Build records byte by byte from the module docstring's table."""

    def record(version: int, kind: int, meta: bytes, payload: bytes) -> bytes:
        fields = MAGIC + struct.pack(">BBII", version, kind, len(meta), len(payload))
        crc = zlib.crc32(fields + meta + payload)
        head = fields + struct.pack(">I", crc)
        return head + struct.pack(">I", zlib.crc32(head)) + meta + payload

    meta = msgpack.packb({"id": "x1", "tag": "t", "count": 3, "pos": {"c" * 64: [10, 2]}})
    newer = record(2, 1, msgpack.packb({"id": "x2"}), b"from the future")
    first = record(1, 1, meta, b"payload-1")
    data = first + newer + record(1, 2, msgpack.packb(["zz"]), b"")
    metas, damage, path = recover_bytes(tmp_path / "d", data)
    assert metas == [Chunk(ChunkId("x1"), "t", 3, 9, {CID: Position(10, 2)}, stored=True)]
    assert damage == [Damage(path, len(first), len(newer), "unsupported record version 2 kind 1")]


# --- releases -------------------------------------------------------------------------------


def test_release_deletes_fully_released_non_current_segments(tmp_path: Path) -> None:
    size = record_size(chunk(0))
    store, _, _ = open_store(tmp_path, segment_bytes=2 * size)
    for i in range(6):
        store.append(chunk(i))
    seg1, seg2, seg3 = segment_files(tmp_path)
    assert store.bytes_used == 6 * size

    assert store.release(ChunkId("chunk-0000"))
    assert segment_files(tmp_path) == [seg1, seg2, seg3]
    assert store.release(ChunkId("chunk-0001"))
    assert segment_files(tmp_path) == [seg2, seg3]
    assert store.bytes_used == 4 * size

    # The current segment stays even when nothing in it is live: appends continue there.
    assert store.release(ChunkId("chunk-0004"))
    assert store.release(ChunkId("chunk-0005"))
    assert segment_files(tmp_path) == [seg2, seg3]

    assert store.release(ChunkId("chunk-0003"))
    assert store.release(ChunkId("chunk-0002"))
    assert segment_files(tmp_path) == [seg3]
    assert store.live_chunks == 0
    assert_accounts(store, tmp_path)

    assert not store.release(ChunkId("chunk-0002"))  # twice
    assert not store.release(ChunkId("never-stored"))
    with pytest.raises(KeyError):
        store.read(ChunkId("chunk-0002"))

    store.close()  # nothing live: the last segment goes too
    assert segment_files(tmp_path) == []


def test_a_release_on_the_event_loop_leaves_the_deletion_to_a_blocking_call(
    tmp_path: Path,
) -> None:
    """With ``collect=False`` (the buffer's calls, on the event loop) a release or a drop
    unlinks nothing; the next blocking call deletes first, so that no release record is
    written for a segment that is gone."""
    size = record_size(chunk(0))
    store, _, _ = open_store(tmp_path, segment_bytes=2 * size)
    for i in range(6):
        store.append(chunk(i))
    seg1, seg2, seg3 = segment_files(tmp_path)

    assert store.release(ChunkId("chunk-0000"), collect=False)
    assert store.release(ChunkId("chunk-0001"), collect=False)
    assert segment_files(tmp_path) == [seg1, seg2, seg3]
    store.persist_releases()
    assert segment_files(tmp_path) == [seg2, seg3]
    assert store.bytes_used == 4 * size  # no release record: its segment went first

    assert store.drop_oldest(collect=False) == meta_of(chunk(2))
    assert store.drop_oldest(collect=False) == meta_of(chunk(3))
    assert segment_files(tmp_path) == [seg2, seg3]
    store.append(chunk(6))
    assert segment_files(tmp_path)[:1] == [seg3]
    assert_accounts(store, tmp_path)
    store.close()


def test_segment_holding_release_records_outlives_the_segment_they_name(tmp_path: Path) -> None:
    size = record_size(chunk(0))
    store, _, _ = open_store(tmp_path, segment_bytes=2 * size)
    store.append(chunk(0))
    store.append(chunk(1))  # segment 1: chunks 0 and 1
    store.release(ChunkId("chunk-0000"))
    store.append(chunk(2))  # segment 2: the release record of chunk 0, then chunk 2
    store.append(chunk(3))  # segment 3: chunk 3
    seg1, seg2, seg3 = segment_files(tmp_path)

    # Segment 2 has nothing live, but it carries chunk 0's release while segment 1 lives.
    store.release(ChunkId("chunk-0002"))
    assert segment_files(tmp_path) == [seg1, seg2, seg3]
    store.close()

    store, metas, _ = open_store(tmp_path, segment_bytes=2 * size)
    assert ids(metas) == names([1, 3])
    # Once segment 1 goes, segment 2 follows in the same pass.
    store.release(ChunkId("chunk-0001"))
    assert segment_files(tmp_path) == [seg3]
    assert_accounts(store, tmp_path)
    store.close()

    store, metas, _ = open_store(tmp_path)
    assert ids(metas) == names([3])
    store.close()


def test_restart_after_clean_close_replays_exactly_the_unreleased(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path, segment_bytes=1500)
    store.append_many([chunk(i) for i in range(12)])
    for i in (0, 1, 2, 5, 8, 11):
        store.release(ChunkId(f"chunk-{i:04d}"))
    store.close()

    store, metas, damage = open_store(tmp_path, segment_bytes=1500)
    assert ids(metas) == names([3, 4, 6, 7, 9, 10])
    assert damage == []
    store.release(ChunkId("chunk-0007"))
    store.release(ChunkId("chunk-0003"))
    store.close()

    store, metas, _ = open_store(tmp_path, segment_bytes=1500)
    assert ids(metas) == names([4, 6, 9, 10])
    store.close()


def test_after_a_crash_only_releases_not_yet_written_replay(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path)
    store.append_many([chunk(i) for i in range(5)])
    store.release(ChunkId("chunk-0000"))
    store.append(chunk(5))  # chunk 0's release rides this append
    store.release(ChunkId("chunk-0001"))
    store.persist_releases()
    store.release(ChunkId("chunk-0002"))  # never written: the "crash" comes first
    # No close(): the next store reads what a crash would leave.
    _, metas, damage = open_store(tmp_path)
    assert ids(metas) == names([2, 3, 4, 5])
    assert damage == []


def test_release_while_the_append_is_in_flight_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = open_store(tmp_path)
    store.append(chunk(0))
    real_fsync = os.fsync
    answers: list[bool] = []

    def fsync_then_ack(fd: int) -> None:
        real_fsync(fd)
        # The aggregator acks chunk 1 before its append has returned.
        answers.append(store.release(ChunkId("chunk-0001")))

    monkeypatch.setattr(os, "fsync", fsync_then_ack)
    store.append(chunk(1))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert answers == [True]
    assert store.live_chunks == 1
    store.close()
    _, metas, _ = open_store(tmp_path)
    assert ids(metas) == names([0])


# --- damage ---------------------------------------------------------------------------------


def test_tail_cut_at_every_offset_of_the_last_record(tmp_path: Path) -> None:
    path, starts = write_segment(tmp_path / "src", [chunk(0), chunk(1), chunk(2)])
    data = path.read_bytes()
    last = starts[-1]
    for cut in range(last, len(data)):
        metas, damage, cut_path = recover_bytes(tmp_path / f"cut{cut}", data[:cut])
        assert ids(metas) == names([0, 1]), cut
        if cut == last:
            assert damage == []
        else:
            assert len(damage) == 1, cut
            assert (damage[0].segment, damage[0].offset) == (cut_path, last)
            assert damage[0].skipped_bytes == cut - last


def test_new_appends_never_follow_a_damaged_tail(tmp_path: Path) -> None:
    path, starts = write_segment(tmp_path, [chunk(0), chunk(1)])
    torn = path.read_bytes()[: starts[1] + 30]
    path.write_bytes(torn)

    store, metas, damage = open_store(tmp_path)
    assert ids(metas) == names([0])
    assert len(damage) == 1
    store.append(chunk(2))
    store.close()
    assert path.read_bytes() == torn
    assert segment_files(tmp_path) == [path.name, "seg-000000000002.fwd"]

    store, metas, damage = open_store(tmp_path)
    assert ids(metas) == names([0, 2])
    assert [(d.segment, d.offset) for d in damage] == [(path, starts[1])]
    store.close()


def test_bit_flip_anywhere_in_a_middle_record_skips_only_that_record(tmp_path: Path) -> None:
    path, starts = write_segment(tmp_path / "src", [chunk(0), chunk(1), chunk(2)])
    data = path.read_bytes()
    first, end = starts[1], starts[2]
    for at in range(first, end):
        flipped = bytearray(data)
        flipped[at] ^= 1 << (at % 8)
        metas, damage, flip_path = recover_bytes(tmp_path / f"flip{at}", bytes(flipped))
        assert ids(metas) == names([0, 2]), at
        assert damage == [Damage(flip_path, first, end - first, damage[0].reason)], at


def test_damaged_body_is_skipped_by_its_length_not_searched(tmp_path: Path) -> None:
    # A payload can hold anything, even our own records (forwarder shipping a buffer file):
    # with a sound header, the scan must not resync into the payload.
    inner, _ = write_segment(tmp_path / "inner", [chunk(9)])
    outer = Chunk.of(ChunkId("outer"), "t", b"x" * 50 + inner.read_bytes(), 1)
    store, _, _ = open_store(tmp_path / "src", fsync=False)
    store.append_many([chunk(0), outer, chunk(2)])
    store.close()
    (path,) = (tmp_path / "src").glob("seg-*.fwd")
    data = bytearray(path.read_bytes())
    start = record_size(chunk(0))
    data[start + record_size(outer) - len(outer.payload)] ^= 0x40
    metas, damage, bad_path = recover_bytes(tmp_path / "bad", bytes(data))
    assert ids(metas) == names([0, 2])
    assert damage == [Damage(bad_path, start, record_size(outer), "CRC mismatch")]


@pytest.mark.parametrize("meta_len", [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 57])
def test_garbage_length_resyncs_at_the_next_record(tmp_path: Path, meta_len: int) -> None:
    path, starts = write_segment(tmp_path / "src", [chunk(0), chunk(1), chunk(2)])
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, starts[1] + 6, meta_len)
    metas, damage, bad_path = recover_bytes(tmp_path / "bad", bytes(data))
    assert ids(metas) == names([0, 2])
    assert damage == [Damage(bad_path, starts[1], starts[2] - starts[1], "header CRC mismatch")]


def test_garbage_between_records_is_one_damage(tmp_path: Path) -> None:
    path, starts = write_segment(tmp_path / "src", [chunk(0), chunk(1)])
    data = path.read_bytes()
    junk = random.Random(7).randbytes(3000).replace(MAGIC, b"")
    spliced = data[: starts[1]] + junk + MAGIC + junk[:40] + data[starts[1] :]
    metas, damage, bad_path = recover_bytes(tmp_path / "bad", spliced)
    assert ids(metas) == names([0, 1])
    assert damage == [Damage(bad_path, starts[1], len(junk) + 44, "no record magic")]
    assert str(damage[0]).startswith(f"{bad_path} at offset {starts[1]}: no record magic")


def test_read_rechecks_the_record(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path)
    store.append_many([chunk(0), chunk(1)])
    (path,) = tmp_path.glob("seg-*.fwd")
    with path.open("r+b") as f:
        f.seek(record_size(chunk(0)) - 5)
        f.write(b"\0")
    with pytest.raises(CorruptChunkError) as caught:
        store.read(ChunkId("chunk-0000"))
    assert caught.value.damage == Damage(path, 0, record_size(chunk(0)), "CRC mismatch")
    assert store.live_chunks == 1  # released: it can never be delivered
    assert store.read(ChunkId("chunk-0001")) == stored(chunk(1))
    store.close()


# --- limits ---------------------------------------------------------------------------------


def test_max_bytes_refuses_and_drop_oldest_makes_room(tmp_path: Path) -> None:
    size = record_size(chunk(0))
    store, _, _ = open_store(tmp_path, max_bytes=5 * size + 10, segment_bytes=2 * size)
    for i in range(5):
        store.append(chunk(i))
    before = segment_files(tmp_path)
    with pytest.raises(BufferFullError) as caught:
        store.append(chunk(5))
    assert (caught.value.needed_bytes, caught.value.used_bytes) == (size, 5 * size)
    with pytest.raises(BufferFullError):
        store.append_many([chunk(5), chunk(6)])
    assert segment_files(tmp_path) == before
    assert store.bytes_used == 5 * size

    assert store.drop_oldest() == meta_of(chunk(0))
    with pytest.raises(BufferFullError):  # segment 1 still holds chunk 1
        store.append(chunk(5))
    assert store.drop_oldest() == meta_of(chunk(1))
    store.append(chunk(5))
    assert store.bytes_used <= store.max_bytes
    assert_accounts(store, tmp_path)
    store.close()

    store, metas, _ = open_store(tmp_path)
    assert ids(metas) == names([2, 3, 4, 5])  # the dropped never come back
    store.close()


def test_drop_oldest_can_empty_the_current_segment(tmp_path: Path) -> None:
    size = record_size(chunk(0))
    store, _, _ = open_store(tmp_path, max_bytes=3 * size)  # all in one current segment
    store.append_many([chunk(0), chunk(1), chunk(2)])
    with pytest.raises(BufferFullError):
        store.append(chunk(3))
    assert [m.chunk_id for m in iter(store.drop_oldest, None)] == names([0, 1, 2])
    assert store.drop_oldest() is None
    store.append(chunk(3))
    assert store.bytes_used == size
    assert segment_files(tmp_path) == ["seg-000000000002.fwd"]
    store.close()


def test_chunk_bigger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path, segment_bytes=1000)
    store.append(chunk(0))
    store.append(chunk(1, size=5000))
    store.append(chunk(2))
    store.append_many([chunk(3, size=4000), chunk(4)])
    files = segment_files(tmp_path)
    sizes = [(tmp_path / f).stat().st_size for f in files]
    assert sizes == [record_size(c) for c in (chunk(0), chunk(1, 5000), chunk(2))] + [
        record_size(chunk(3, 4000)),
        record_size(chunk(4)),
    ]
    store.close()

    store, metas, damage = open_store(tmp_path, segment_bytes=1000)
    assert ids(metas) == names([0, 1, 2, 3, 4])
    assert damage == []
    assert store.read(ChunkId("chunk-0001")).payload == chunk(1, size=5000).payload
    store.close()


# --- fsync ----------------------------------------------------------------------------------


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real: Callable[[int], None] = os.fsync

    def counting(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_append_many_is_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, _, _ = open_store(tmp_path)
    calls = count_fsyncs(monkeypatch)
    store.append(chunk(0))
    assert sorted(calls) == ["dir", "file"]  # a new segment: its name is synced too

    calls.clear()
    store.append_many([chunk(i) for i in range(1, 9)])
    assert calls == ["file"]

    calls.clear()
    for i in range(9, 17):
        store.append(chunk(i))
    assert calls == ["file"] * 8

    calls.clear()
    store.release(ChunkId("chunk-0000"))
    store.persist_releases()
    assert calls == ["file"]
    store.close()


def test_fsync_off_never_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_fsyncs(monkeypatch)
    store, _, _ = open_store(tmp_path, fsync=False)
    store.append_many([chunk(0), chunk(1)])
    store.release(ChunkId("chunk-0000"))
    store.close()
    assert calls == []


# --- failures and misuse --------------------------------------------------------------------


def test_a_failed_write_abandons_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = open_store(tmp_path)
    store.append(chunk(0))
    (first,) = tmp_path.glob("seg-*.fwd")
    size = first.stat().st_size
    real_writev = os.writev

    def half_then_enospc(fd: int, buffers: list[memoryview]) -> int:
        os.write(fd, bytes(buffers[0][:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        store.append(chunk(1))
    monkeypatch.setattr(os, "writev", real_writev)
    assert first.stat().st_size == size  # the torn record was cut off
    assert store.live_chunks == 1
    assert_accounts(store, tmp_path)

    store.append(chunk(1))
    assert segment_files(tmp_path) == [first.name, "seg-000000000002.fwd"]
    store.close()
    _, metas, damage = open_store(tmp_path)
    assert (ids(metas), damage) == (names([0, 1]), [])


def test_misuse_is_refused(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path, max_bytes=BIG)
    with pytest.raises(RuntimeError, match="recover"):
        store.append(chunk(0))
    store.recover()
    with pytest.raises(RuntimeError, match="once"):
        store.recover()
    store.append(chunk(0))
    with pytest.raises(ValueError, match="already stored"):
        store.append(chunk(0))
    with pytest.raises(ValueError, match="already stored"):
        store.append_many([chunk(1), chunk(1)])
    assert store.live_chunks == 1
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.append(chunk(2))
    with pytest.raises(RuntimeError, match="closed"):
        store.release(ChunkId("chunk-0000"))
    with pytest.raises(ValueError, match="must be positive"):
        SegmentStore(tmp_path, max_bytes=0)


def test_other_files_are_ignored_and_numbering_continues(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "seg-000000000007.fwd").write_bytes(b"")  # created, then a crash
    store, metas, damage = open_store(tmp_path)
    assert (metas, damage) == ([], [])
    store.append(chunk(0))
    assert segment_files(tmp_path) == ["seg-000000000008.fwd"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    store.close()


def test_one_writer_thread_and_releases_from_another(tmp_path: Path) -> None:
    store, _, _ = open_store(tmp_path, segment_bytes=4000, fsync=False)
    appended: queue.Queue[ChunkId | None] = queue.Queue()

    def writer() -> None:
        for n in range(0, 600, 3):
            batch = [chunk(i) for i in range(n, n + 3)]
            store.append_many(batch)
            for c in batch:
                appended.put(c.chunk_id)
        appended.put(None)

    thread = threading.Thread(target=writer)
    thread.start()
    while (chunk_id := appended.get()) is not None:
        if chunk_id != "chunk-0599":
            assert store.release(chunk_id)
    thread.join()
    assert store.live_chunks == 1
    assert_accounts(store, tmp_path)
    store.close()
    assert len(segment_files(tmp_path)) == 1
    _, metas, _ = open_store(tmp_path)
    assert ids(metas) == names([599])
