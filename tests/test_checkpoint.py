from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from forwarder.checkpoint import Checkpointer, PositionStore, PositionTracker, SavedState
from forwarder.records import ContainerId, Position

A, B = ContainerId("a" * 64), ContainerId("b" * 64)


def test_positions_commit_only_in_sealing_order() -> None:
    tracker = PositionTracker()
    tracker.sealed(1, {A: Position(10, 1)})
    tracker.sealed(2, {A: Position(20, 1), B: Position(5, 1)})
    assert tracker.delivered(2) is False  # chunk 1 is still out: nothing may move
    assert tracker.committed == {}
    assert tracker.in_flight(A)
    assert tracker.in_flight(B)
    assert tracker.delivered(1) is True
    assert tracker.committed == {A: Position(20, 1), B: Position(5, 1)}
    assert tracker.pending_chunks == 0


def test_a_position_never_moves_back() -> None:
    tracker = PositionTracker({A: Position(50, 3)})
    tracker.sealed(1, {A: Position(40, 1)})
    tracker.delivered(1)
    assert tracker.committed[A] == Position(50, 3)


def test_unknown_delivery_is_ignored() -> None:
    tracker = PositionTracker()
    assert tracker.delivered(99) is False


def test_store_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    store = PositionStore(tmp_path / "state")
    assert store.load() == SavedState({}, None)
    store.save({A: Position(1_700_000_000_123_456_789, 2)}, now_ns=42, engine_seen_ns=40)
    assert store.load() == SavedState({A: Position(1_700_000_000_123_456_789, 2)}, 40)
    assert not list((tmp_path / "state").glob("*.tmp"))
    data = json.loads(store.path.read_text())
    assert data["positions"][A] == [1_700_000_000_123_456_789, 2]


def test_damaged_store_is_set_aside_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PositionStore(tmp_path)
    store.path.write_text('{"positions": {"x": ')
    written_ns = store.path.stat().st_mtime_ns
    # A run was here: a restart (from the head, replaying rather than losing), and the
    # containers that finished since the file was written are caught up.
    assert store.load() == SavedState({}, written_ns)
    assert "damaged" in caplog.text
    assert (tmp_path / "positions.json.damaged").exists()


def test_save_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    PositionStore(tmp_path).save({}, 1, None)
    assert len(calls) == 2


def test_a_run_that_never_reached_the_engine_leaves_a_first_start(tmp_path: Path) -> None:
    store = PositionStore(tmp_path)
    store.save({}, now_ns=42, engine_seen_ns=None)
    assert store.path.exists()
    assert store.load().first_start


def test_a_run_that_listed_the_engine_makes_the_next_a_restart(tmp_path: Path) -> None:
    store = PositionStore(tmp_path)
    store.save({}, now_ns=42, engine_seen_ns=41)  # no container, yet the engine was seen
    saved = store.load()
    assert not saved.first_start
    assert saved.engine_seen_ns == 41


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Positions prove that containers were followed: a restart, as before.
        ({"positions": {A: [10, 1]}, "saved_at_ns": 50}, SavedState({A: Position(10, 1)}, 50)),
        # An empty file proves nothing (the run that wrote it may never have reached the
        # engine): a first start, so read_from = "tail" holds and no history floods out.
        ({"positions": {}, "saved_at_ns": 50}, SavedState({}, None)),
    ],
)
def test_a_file_from_before_engine_seen_ns(
    tmp_path: Path, body: dict[str, object], expected: SavedState
) -> None:
    store = PositionStore(tmp_path)
    store.path.write_text(json.dumps({"version": 1, **body}))
    assert store.load() == expected


def test_a_position_to_start_at_commits_unless_one_is_known() -> None:
    tracker = PositionTracker({A: Position(50, 3)})
    tracker.start_at(A, Position(90, 0))
    tracker.start_at(B, Position(90, 0))
    assert tracker.committed == {A: Position(50, 3), B: Position(90, 0)}
    tracker.sealed(1, {B: Position(95, 1)})
    assert tracker.delivered(1)
    assert tracker.committed[B] == Position(95, 1)


class RecordingStore(PositionStore):
    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.saved: list[dict[ContainerId, Position]] = []

    def save(
        self, positions: dict[ContainerId, Position], now_ns: int, engine_seen_ns: int | None
    ) -> None:
        del (
            now_ns,
            engine_seen_ns,
        )  # the signature is PositionStore.save's; only the positions count here
        self.saved.append(positions)


def test_saves_are_coalesced_to_one_per_interval(tmp_path: Path) -> None:
    """Not one save (two fsyncs) per ack: the first at once, then the deliveries of each
    interval in one save."""

    async def main() -> None:
        store = RecordingStore(tmp_path)
        tracker = PositionTracker()
        interval_over = asyncio.Event()
        sleeping = asyncio.Event()
        intervals: list[float] = []

        async def sleep(seconds: float) -> None:
            intervals.append(seconds)
            sleeping.set()
            await interval_over.wait()
            interval_over.clear()

        checkpointer = Checkpointer(store, tracker, lambda: None, interval_s=0.1, sleep=sleep)
        task = asyncio.create_task(checkpointer.run())
        tracker.start_at(A, Position(1, 0))
        checkpointer.mark()
        await sleeping.wait()
        sleeping.clear()
        assert store.saved == [{A: Position(1, 0)}]
        for n in range(2, 50):  # acks while the interval runs
            tracker.committed[A] = Position(n, 1)
            checkpointer.mark()
            await asyncio.sleep(0)
        assert len(store.saved) == 1
        interval_over.set()
        await sleeping.wait()
        assert store.saved == [{A: Position(1, 0)}, {A: Position(49, 1)}]
        assert intervals == [0.1, 0.1]
        task.cancel()

    asyncio.run(main())
