from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from forwarder.checkpoint import PositionStore, PositionTracker
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
    assert store.load() == ({}, None)
    store.save({A: Position(1_700_000_000_123_456_789, 2)}, now_ns=42)
    assert store.load() == ({A: Position(1_700_000_000_123_456_789, 2)}, 42)
    assert not list((tmp_path / "state").glob("*.tmp"))
    data = json.loads(store.path.read_text())
    assert data["positions"][A] == [1_700_000_000_123_456_789, 2]


def test_damaged_store_is_set_aside_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PositionStore(tmp_path)
    store.path.write_text('{"positions": {"x": ')
    assert store.load() == ({}, None)
    assert "damaged" in caplog.text
    assert (tmp_path / "positions.json.damaged").exists()


def test_save_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    PositionStore(tmp_path).save({}, 1)
    assert len(calls) == 2
