"""Per-container read positions: which lines are delivered, and where to resume.

A position moves only when the chunk carrying it is delivered (acked, or durable in the disk
buffer). Chunks can be delivered out of order (several servers), so the tracker commits only
the longest run of delivered chunks in sealing order: a later chunk's position never jumps
over an earlier chunk that is still in flight.

Positions are saved as JSON under the state directory: write a temp file, fsync, rename,
fsync the directory. A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from forwarder.fsutil import fsync_directory
from forwarder.records import ContainerId, Position

log = logging.getLogger(__name__)

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
                if old is None or pos > old:
                    self.committed[cid] = pos
                    moved = True
        return moved

    def in_flight(self, cid: ContainerId) -> bool:
        return any(cid in positions for positions, _ in self._pending.values())

    def forget(self, cid: ContainerId) -> None:
        """Drop a removed container's position (only once nothing of it is in flight)."""
        self.committed.pop(cid, None)

    @property
    def pending_chunks(self) -> int:
        return len(self._pending)


class PositionStore:
    """The positions file under the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "positions.json"

    def load(self) -> tuple[dict[ContainerId, Position], int | None]:
        """Saved positions and the time (ns) of the last save, or empty on a first start."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, None
        try:
            data = json.loads(raw)
            positions = {
                ContainerId(cid): Position(int(p[0]), int(p[1]))
                for cid, p in data["positions"].items()
            }
            return positions, int(data.get("saved_at_ns") or 0) or None
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            # A damaged file can't be trusted; starting over replays rather than loses.
            broken = self.path.with_suffix(".json.damaged")
            os.replace(self.path, broken)
            log.warning("positions file %s is damaged (%s); moved to %s", self.path, exc, broken)
            return {}, None

    def save(self, positions: dict[ContainerId, Position], now_ns: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        body: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "saved_at_ns": now_ns,
            "positions": {cid: [p.ts_ns, p.taken] for cid, p in sorted(positions.items())},
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
