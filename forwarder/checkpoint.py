"""Per-container read positions: which lines are delivered, and where to resume.

A position moves only when the chunk carrying it is delivered (acked, or durable in the disk
buffer). Chunks can be delivered out of order (several servers), so the tracker commits only
the longest run of delivered chunks in sealing order: a later chunk's position never jumps
over an earlier chunk that is still in flight.

Positions are saved as JSON under the state directory: write a temp file, fsync, rename,
fsync the directory. A crash leaves either the old file or the new one, never half of one.
The :class:`Checkpointer` saves them after deliveries, at a bounded rate.

Beside the positions the file says up to when a run from this state watched the engine
(``engine_seen_ns``): absent until a run has listed the engine's containers. That, not the
file's existence, is what makes a start a restart: a run that never reached the engine (a
wrong socket, say) writes the file all the same, and its successor must still apply
``read_from`` as a first start does. It is also the horizon of the stopped-containers
catch-up, so a run that never saw the engine must not move it either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwarder import tuning
from forwarder.fsutil import fsync_directory
from forwarder.records import ContainerId, Position

log = logging.getLogger(__name__)
# The name the checkpointer's lines carry in the log, as when it lived in the pipeline module:
# users read it and filter on it.
checkpointer_log = logging.getLogger("forwarder.pipeline")

FORMAT_VERSION = 1


class PositionTracker:
    """Sans-I/O: chunks are registered when sealed and marked when delivered."""

    def __init__(self, committed: dict[ContainerId, Position] | None = None) -> None:
        self.committed: dict[ContainerId, Position] = dict(committed or {})
        # seq -> (positions, delivered?) in sealing order
        self._pending: OrderedDict[int, tuple[dict[ContainerId, Position], bool]] = OrderedDict()

    def sealed(self, seq: int, positions: dict[ContainerId, Position]) -> None:
        self._pending[seq] = (positions, False)

    def delivered(self, seq: int) -> bool:
        """Mark a chunk delivered; returns True when committed positions moved."""
        entry = self._pending.get(seq)
        if entry is None:
            return False
        self._pending[seq] = (entry[0], True)
        moved = False
        while self._pending:
            first_seq, (positions, done) = next(iter(self._pending.items()))
            if not done:
                break
            del self._pending[first_seq]
            for cid, pos in positions.items():
                old = self.committed.get(cid)
                if old is None or pos.later_than(old):
                    self.committed[cid] = pos
                    moved = True
        return moved

    def in_flight(self, cid: ContainerId) -> bool:
        return any(cid in positions for positions, _ in self._pending.values())

    def start_at(self, cid: ContainerId, position: Position) -> None:
        """A container is read from ``position`` on (``read_from = "tail"``): nothing before
        it is ever to be sent, so it commits at once, unless a position is known already."""
        self.committed.setdefault(cid, position)

    def forget(self, cid: ContainerId) -> None:
        """Drop a removed container's position (only once nothing of it is in flight)."""
        self.committed.pop(cid, None)

    @property
    def pending_chunks(self) -> int:
        return len(self._pending)


@dataclass(frozen=True, slots=True)
class SavedState:
    """What the positions file holds."""

    positions: dict[ContainerId, Position] = field(default_factory=dict)
    engine_seen_ns: int | None = None
    """Up to when a run from this state watched the engine (listed its containers, then
    followed its events); None if no run ever reached it. Containers that finished later
    may hold lines not read yet."""

    @property
    def first_start(self) -> bool:
        """No run from this state ever reached the engine, so none followed a container."""
        return self.engine_seen_ns is None


class PositionStore:
    """The positions file under the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "positions.json"

    def load(self) -> SavedState:
        """The saved state; an empty one (a first start) if there is no file."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return SavedState()
        try:
            data = json.loads(raw)
            positions = {
                ContainerId(cid): Position.from_list(p) for cid, p in data["positions"].items()
            }
            if "engine_seen_ns" in data:
                seen = data["engine_seen_ns"]
                return SavedState(positions, None if seen is None else int(seen))
            # Written before engine_seen_ns existed. Positions prove that a run followed
            # containers (up to its last save, as far as it can tell). A file without any
            # proves nothing: the run that wrote it may never have reached the engine, and
            # taking it for a restart would send every running container's whole history.
            if positions:
                return SavedState(positions, int(data.get("saved_at_ns") or 0))
            return SavedState()
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            # A damaged file can't be trusted, but it shows that a run was here: starting
            # over as a restart replays rather than loses (no "tail" that skips lines), and
            # containers that finished after the file was last written are caught up.
            seen_ns = self.path.stat().st_mtime_ns
            broken = self.path.with_suffix(".json.damaged")
            os.replace(self.path, broken)
            log.warning("positions file %s is damaged (%s); moved to %s", self.path, exc, broken)
            return SavedState({}, seen_ns)

    def save(
        self, positions: dict[ContainerId, Position], now_ns: int, engine_seen_ns: int | None
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "saved_at_ns": now_ns,
            "engine_seen_ns": engine_seen_ns,
            "positions": {cid: p.to_list() for cid, p in sorted(positions.items())},
        }
        data = json.dumps(body, separators=(",", ":")).encode()
        tmp = self.path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_directory(self.dir)


class Checkpointer:
    """Saves committed positions after deliveries: at once after a quiet spell, then at most
    once per ``interval_s``, the deliveries in between coalesced into one save."""

    def __init__(
        self,
        store: PositionStore,
        tracker: PositionTracker,
        engine_seen_ns: Callable[[], int | None],
        *,
        interval_s: float = tuning.POSITIONS_SAVE_INTERVAL_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.engine_seen_ns = engine_seen_ns
        self.interval_s = interval_s
        self._sleep = sleep
        self._dirty = asyncio.Event()
        self.saves = 0

    def mark(self) -> None:
        self._dirty.set()

    async def save_now(self) -> None:
        self._dirty.clear()
        snapshot = dict(self.tracker.committed)
        seen_ns = self.engine_seen_ns()
        await asyncio.to_thread(self.store.save, snapshot, time.time_ns(), seen_ns)
        self.saves += 1

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            try:
                await self.save_now()
            except OSError as exc:
                checkpointer_log.error("can't save positions to %s: %s", self.store.path, exc)
                await asyncio.sleep(tuning.POSITIONS_SAVE_RETRY_S)
                self._dirty.set()
                continue
            await self._sleep(self.interval_s)
