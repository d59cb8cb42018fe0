"""The on-disk chunk store behind the durable buffer: append-only segment files.

Chunks are appended to ``seg-<12-digit seq>.fwd`` files in one directory (``[state] dir``
/buffer). A new segment starts when the current one would grow past ``segment_bytes``; a chunk
larger than that gets a segment of its own. Segments are never rewritten. A segment is deleted
once every chunk in it is released (acked, or dropped), subject to the rule in `Releases`.

Record layout (all integers big-endian)::

    offset size field
    0      4    magic        b"\\x89FWD" (the high bit catches 7-bit damage)
    4      1    version      1
    5      1    kind         1 = chunk, 2 = release
    6      4    meta_len     length of the msgpack metadata
    10     4    payload_len  length of the payload (0 for a release record)
    14     4    crc          zlib.crc32 of bytes 0..14, then the metadata, then the payload
    18     4    head_crc     zlib.crc32 of bytes 0..18
    22          metadata     chunk:   {"id": str, "tag": str, "count": int,
                                       "pos": {container_id: [ts_ns, count]}}
                             release: [chunk_id, ...]
    22+m        payload      the chunk's bytes, opaque here

Why two CRCs: ``crc`` proves the record whole. ``head_crc`` proves the *lengths* can be
trusted on their own, which is what recovery needs to tell "the body is damaged, skip exactly
this record" from "the header is garbage, scan forward for the next magic". With a single CRC a
flipped length bit and a flipped payload bit look the same, and guessing wrong either eats good
records or resyncs into a payload.

Releases
--------
A release is persisted as a release record appended to the *current* segment, not in a sidecar
file per segment: it rides the next append's write and fsync for free (group commit), there is
one framing and one recovery path for both kinds, and no extra files to create and fsync into
the directory. Releases are written with the next append, by `persist_releases`, or by
`close`; a crash replays the delivered chunks whose release was not written yet:
at-least-once. After a clean `close` none is. The buffer (:mod:`forwarder.buffer`) calls
`persist_releases` as soon as releases come, so that this window stays small.

The cost of keeping releases in the current segment: a segment S whose release records name
chunks of an older segment O must outlive O, or a restart would replay O's released chunks.
Each segment remembers which older segments its release records name (``release_targets``), and
deletion runs oldest first, so deleting O frees S in the same pass.

Durability: `append` / `append_many` write, then fsync the file (and the directory when they
created a segment) before returning. Recovery starts a new segment, so nothing is ever appended
after a damaged tail; a failed write cuts its torn record off and abandons the segment too.

Space: ``max_bytes`` caps the segment files' total size. An append that would pass it raises
`BufferFullError` rather than returning False: a False is easy to ignore, and ignoring it
would lose a chunk silently. The caller then waits (backpressure) or calls `drop_oldest` and
retries. Released records count until their segment is deleted.

Memory: `recover` returns the chunks without their payloads and `read` loads one when it is
due, since
the disk buffer (``[buffer] max_bytes``, 256 MiB by default) may be far larger than the memory
queue (``[output] buffer_limit``).

Threads: the blocking calls (`recover`, `append`, `append_many`, `persist_releases`, `read`,
`close`) are meant for an executor thread. `release` and `drop_oldest` update the index, but
a segment they empty is deleted at once, and an unlink is not cheap: 0.15 to 0.25 ms for a
128 KiB segment, 1.6 to 1.9 ms for an 8 MiB one (medians; up to 4 ms). On the event loop
they are called with ``collect=False``, which leaves the deletion to the next blocking call:
each starts by deleting what is fully released. (The buffer writes the release records at
once, so that is a moment later, in a thread.) Two locks: ``_io`` serializes writers and is
held across write and fsync; ``_lock`` guards the index and is never held across a write or
an fsync, so a release never waits for a disk flush. Lock order: ``_io`` before ``_lock``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgpack

from forwarder import tuning
from forwarder.chunks import Chunk, ChunkId
from forwarder.fsutil import fsync_directory
from forwarder.records import ContainerId, Position

log = logging.getLogger(__name__)

MAGIC: Final = b"\x89FWD"
VERSION: Final = 1
KIND_CHUNK: Final = 1
KIND_RELEASE: Final = 2

_FIELDS = struct.Struct(">4sBBII")  # magic, version, kind, meta_len, payload_len
_U32 = struct.Struct(">I")
HEADER_BYTES: Final = _FIELDS.size + 2 * _U32.size  # 22
_MAX_LEN = 0xFFFFFFFF

_SEGMENT_NAME = re.compile(r"^seg-(\d{12})\.fwd$")
_IOV_MAX = 1024  # Linux's limit on buffers per writev


class BufferFullError(Exception):
    """The store holds ``max_bytes`` already: the caller waits (backpressure) or drops."""

    def __init__(self, needed_bytes: int, used_bytes: int, max_bytes: int) -> None:
        super().__init__(
            f"disk buffer full: {needed_bytes} more bytes would exceed max_bytes={max_bytes} "
            f"({used_bytes} in use)"
        )
        self.needed_bytes = needed_bytes
        self.used_bytes = used_bytes
        self.max_bytes = max_bytes


class CorruptChunkError(Exception):
    """A chunk's record no longer checks out on disk; `read` released it, nothing to send."""

    def __init__(self, damage: Damage) -> None:
        super().__init__(str(damage))
        self.damage = damage


@dataclass(frozen=True, slots=True)
class Damage:
    """A stretch of a segment that recovery skipped. One per damaged stretch, to log once."""

    segment: Path
    offset: int
    skipped_bytes: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.segment} at offset {self.offset}: {self.reason} "
            f"({self.skipped_bytes} bytes skipped)"
        )


# --- framing: pure functions over bytes -------------------------------------------------------


def _encode_record(kind: int, meta: bytes, payload: bytes = b"") -> bytes:
    """The header and metadata of one record; the payload follows them on disk."""
    if len(meta) > _MAX_LEN or len(payload) > _MAX_LEN:
        raise ValueError("a record's metadata and payload must each be under 4 GiB")
    fields = _FIELDS.pack(MAGIC, VERSION, kind, len(meta), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(meta, zlib.crc32(fields)))
    head = fields + _U32.pack(crc)
    return head + _U32.pack(zlib.crc32(head)) + meta


def _encode_chunk_meta(chunk: Chunk) -> bytes:
    packed: bytes = msgpack.packb(
        {"id": chunk.chunk_id, "tag": chunk.tag, "count": chunk.count, "pos": chunk.positions}
    )
    return packed


def _decode_chunk_meta(meta: bytes, payload_bytes: int) -> Chunk:
    """The chunk a record's metadata describes, its payload not loaded."""
    try:
        m = msgpack.unpackb(meta)
        cid, tag, count, pos = m["id"], m["tag"], m["count"], m["pos"]
        if not (
            isinstance(cid, str)
            and isinstance(tag, str)
            and type(count) is int
            and isinstance(pos, dict)
        ):
            raise ValueError("wrong field types")
        positions = {ContainerId(str(k)): Position.from_list(v) for k, v in pos.items()}
    except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
        raise ValueError(f"bad chunk metadata: {exc}") from exc
    return Chunk(ChunkId(cid), tag, count, payload_bytes, positions, stored=True)


def _decode_release_meta(meta: bytes) -> list[ChunkId]:
    try:
        ids = msgpack.unpackb(meta)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("not a list of chunk ids")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"bad release metadata: {exc}") from exc
    return [ChunkId(i) for i in ids]


@dataclass(frozen=True, slots=True)
class _Header:
    version: int
    kind: int
    meta_len: int
    payload_len: int
    crc: int

    @property
    def record_bytes(self) -> int:
        return HEADER_BYTES + self.meta_len + self.payload_len


def _parse_header(data: bytes | memoryview, offset: int) -> _Header | str:
    """The header at ``offset``, or why there is none there (then its lengths mean nothing)."""
    if len(data) - offset < HEADER_BYTES:
        return "truncated header"
    magic, version, kind, meta_len, payload_len = _FIELDS.unpack_from(data, offset)
    if magic != MAGIC:
        return "no record magic"
    (crc,) = _U32.unpack_from(data, offset + _FIELDS.size)
    (head_crc,) = _U32.unpack_from(data, offset + _FIELDS.size + _U32.size)
    if zlib.crc32(data[offset : offset + _FIELDS.size + _U32.size]) != head_crc:
        return "header CRC mismatch"
    return _Header(version, kind, meta_len, payload_len, crc)


def _body_ok(data: bytes | memoryview, offset: int, header: _Header) -> bool:
    fields = data[offset : offset + _FIELDS.size]
    body = data[offset + HEADER_BYTES : offset + header.record_bytes]
    return zlib.crc32(body, zlib.crc32(fields)) == header.crc


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int
    header: _Header


@dataclass(frozen=True, slots=True)
class _Bad:
    offset: int
    skipped_bytes: int
    reason: str


def _scan(data: bytes) -> Iterator[_Record | _Bad]:
    """Walks one segment's bytes: every sound record, and one `_Bad` per damaged stretch.

    A record whose header checks out but whose body does not is skipped by its length. Where
    the header itself is unsound the lengths are worthless, so the scan moves on to the next
    offset holding a sound header; if there is none, the rest of the segment is the damage (a
    torn tail). A header whose record runs past the end of the data is a torn write.
    """
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        header = _parse_header(view, offset)
        if isinstance(header, str):
            resume = _resync(data, view, offset + 1)
            yield _Bad(offset, resume - offset, header)
            offset = resume
            continue
        record_end = offset + header.record_bytes
        if record_end > end:
            yield _Bad(
                offset,
                end - offset,
                f"record of {header.record_bytes} bytes runs past the end (torn write)",
            )
            return
        if not _body_ok(view, offset, header):
            yield _Bad(offset, header.record_bytes, "CRC mismatch")
        elif header.version != VERSION or header.kind not in (KIND_CHUNK, KIND_RELEASE):
            yield _Bad(
                offset,
                header.record_bytes,
                f"unsupported record version {header.version} kind {header.kind}",
            )
        else:
            yield _Record(offset, header)
        offset = record_end


def _resync(data: bytes, view: memoryview, start: int) -> int:
    """The next offset from ``start`` holding a sound header, or the end of the data."""
    while (found := data.find(MAGIC, start)) >= 0:
        if not isinstance(_parse_header(view, found), str):
            return found
        start = found + 1
    return len(data)


# --- the store ----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Segment:
    seq: int
    path: Path
    size: int = 0
    live: int = 0
    # Older segments named by this segment's release records: it must outlive them.
    release_targets: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Entry:
    chunk: Chunk  # its payload not loaded
    seq: int  # the segment's
    offset: int
    head_bytes: int  # header plus metadata; the payload follows


def _check_record(head: bytes, payload: bytes, entry: _Entry) -> str | None:
    """Why a record read back for ``entry`` is unsound, or None if it is sound."""
    header = _parse_header(head, 0)
    if isinstance(header, str):
        return header
    if (
        len(head) != entry.head_bytes
        or len(payload) != entry.chunk.size
        or header.record_bytes != entry.head_bytes + entry.chunk.size
    ):
        return "record shorter than indexed"
    meta = head[HEADER_BYTES:]
    if zlib.crc32(payload, zlib.crc32(meta, zlib.crc32(head[: _FIELDS.size]))) != header.crc:
        return "CRC mismatch"
    return None


@dataclass(frozen=True, slots=True)
class _Item:
    """One encoded record waiting to be written."""

    buffers: tuple[bytes, ...]
    size: int


class _State(enum.Enum):
    NEW = "new"  # recover() not yet run
    OPEN = "open"
    CLOSED = "closed"


def _item(head: bytes, payload: bytes = b"") -> _Item:
    return _Item((head, payload) if payload else (head,), len(head) + len(payload))


def _total(items: list[_Item]) -> int:
    return sum(item.size for item in items)


def _write_all(fd: int, buffers: list[bytes]) -> None:
    views = [memoryview(b) for b in buffers if b]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


class SegmentStore:
    """Chunks on disk in append-only segments. See the module docstring for the format."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = tuning.SEGMENT_MAX_BYTES,
        fsync: bool = True,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._io = threading.Lock()
        self._lock = threading.Lock()
        self._state = _State.NEW
        # Both in ascending seq (insertion) order, which the oldest-first logic relies on.
        self._segments: dict[int, _Segment] = {}
        self._live: OrderedDict[ChunkId, _Entry] = OrderedDict()
        # Released, but the release record is not on disk yet: chunk id -> its segment.
        self._unwritten: dict[ChunkId, int] = {}
        # Chunks of the append in progress, and those of them released before it returned
        # (the caller may send a chunk while it is being made durable).
        self._writing: set[ChunkId] = set()
        self._released_early: set[ChunkId] = set()
        # Segments the write in progress touches: never deleted under it.
        self._busy: set[int] = set()
        self._current: _Segment | None = None
        self._fd = -1
        self._next_seq = 1
        self._bytes_used = 0

    def __repr__(self) -> str:
        return (
            f"<SegmentStore {self.directory} {self._state.name} segments={len(self._segments)} "
            f"live={len(self._live)} bytes={self._bytes_used}/{self.max_bytes}>"
        )

    @property
    def bytes_used(self) -> int:
        """Bytes of segment files on disk, released records included until their file goes."""
        return self._bytes_used

    @property
    def live_chunks(self) -> int:
        return len(self._live)

    # --- start ------------------------------------------------------------------------------

    def recover(self) -> tuple[list[Chunk], list[Damage]]:
        """Scans the segments: the live chunks oldest first, and the damage found.

        Must run once, before the first append. Payloads stay on disk (the buffer on disk may
        be far larger than the memory queue): `read` fetches one when it is due.
        """
        # Nothing else can usefully run before recovery, so holding both locks across the
        # reads is harmless here.
        with self._io, self._lock:
            if self._state is not _State.NEW:
                raise RuntimeError("recover() runs once, before any append")
            self.directory.mkdir(parents=True, exist_ok=True)
            found = sorted(
                (int(m[1]), path)
                for path in self.directory.iterdir()
                if (m := _SEGMENT_NAME.match(path.name))
            )
            damage: list[Damage] = []
            for seq, path in found:
                self._load(seq, path, damage)
            self._next_seq = found[-1][0] + 1 if found else 1
            self._state = _State.OPEN
            self._collect()
            return [entry.chunk for entry in self._live.values()], damage

    def _load(self, seq: int, path: Path, damage: list[Damage]) -> None:
        data = path.read_bytes()
        segment = _Segment(seq, path, size=len(data))
        self._segments[seq] = segment
        self._bytes_used += len(data)
        for item in _scan(data):
            if isinstance(item, _Bad):
                damage.append(Damage(path, item.offset, item.skipped_bytes, item.reason))
                continue
            header = item.header
            meta_start = item.offset + HEADER_BYTES
            meta = data[meta_start : meta_start + header.meta_len]
            try:
                if header.kind == KIND_CHUNK:
                    chunk = _decode_chunk_meta(meta, header.payload_len)
                    entry = _Entry(chunk, seq, item.offset, HEADER_BYTES + header.meta_len)
                    # An id already live can only come from a second append of the same chunk
                    # (the store refuses that while it runs): the newer record wins.
                    self._forget(chunk.chunk_id)
                    self._add_live(entry)
                else:
                    for chunk_id in _decode_release_meta(meta):
                        target = self._forget(chunk_id)
                        if target is not None and target != seq:
                            segment.release_targets.add(target)
            except ValueError as exc:
                damage.append(Damage(path, item.offset, header.record_bytes, str(exc)))

    def _forget(self, chunk_id: ChunkId) -> int | None:
        entry = self._live.pop(chunk_id, None)
        if entry is None:
            return None
        self._segments[entry.seq].live -= 1
        return entry.seq

    def _add_live(self, entry: _Entry) -> None:
        self._live[entry.chunk.chunk_id] = entry
        self._segments[entry.seq].live += 1

    # --- writes -----------------------------------------------------------------------------

    def append(self, chunk: Chunk) -> None:
        """Writes one chunk and makes it durable. Raises `BufferFullError` past ``max_bytes``."""
        self.append_many((chunk,))

    def append_many(self, chunks: Sequence[Chunk]) -> None:
        """Writes several chunks with one fsync (group commit): all are stored, or none.

        Raises `BufferFullError` if they don't all fit under ``max_bytes`` (nothing written),
        ``ValueError`` for a chunk id already stored, ``OSError`` from the disk (then the
        segment is abandoned and the next append starts a new one).
        """
        if chunks:
            encoded = [
                _item(_encode_record(KIND_CHUNK, _encode_chunk_meta(c), c.payload), c.payload)
                for c in chunks
            ]
            with self._io:
                self._commit(chunks, encoded)

    def persist_releases(self) -> None:
        """Writes the releases not yet on disk (they otherwise ride the next append)."""
        with self._io:
            self._commit((), [])

    def _commit(self, chunks: Sequence[Chunk], encoded: list[_Item]) -> None:
        """Writes the releases not yet on disk, then ``chunks``. Runs with ``_io`` held."""
        ids = [c.chunk_id for c in chunks]
        with self._lock:
            self._check_open()
            if len(set(ids)) != len(ids) or any(i in self._live for i in ids):
                raise ValueError("a chunk id is already stored")
            self._collect()  # what releases on the event loop left to delete
            released, items = self._with_releases(encoded)
            if not items:
                return
            # Release records alone always go through: they are what lets space be freed.
            if encoded and self._bytes_used + _total(items) > self.max_bytes:
                # A current segment with nothing live (everything in it dropped, say) would
                # pin its bytes: retire it, which may also make some releases moot.
                current = self._current
                if current is not None and current.live == 0:
                    self._close_current()
                    self._collect()
                    released, items = self._with_releases(encoded)
                if self._bytes_used + _total(items) > self.max_bytes:
                    raise BufferFullError(_total(items), self._bytes_used, self.max_bytes)
            self._writing.update(ids)
            self._busy = {self._current.seq} if self._current is not None else set()
        try:
            placed = self._write(items)
        except BaseException:
            with self._lock:
                self._writing.difference_update(ids)
                self._released_early.difference_update(ids)
                self._busy.clear()
                self._collect()
            raise
        with self._lock:
            self._writing.difference_update(ids)
            self._busy.clear()
            # Register before collecting: a segment the batch rolled away from may now be
            # deletable, but only once it is known to carry the release record.
            if released:
                self._note_released(released, placed[0][0])
            chunk_places = placed[len(items) - len(encoded) :]
            for chunk, item, (seq, offset) in zip(chunks, encoded, chunk_places, strict=True):
                if chunk.chunk_id in self._released_early:
                    self._released_early.discard(chunk.chunk_id)
                    self._unwritten[chunk.chunk_id] = seq
                    continue
                held = Chunk(
                    chunk.chunk_id,
                    chunk.tag,
                    chunk.count,
                    chunk.size,
                    dict(chunk.positions),
                    stored=True,
                )
                self._add_live(_Entry(held, seq, offset, len(item.buffers[0])))
            self._collect()

    def _with_releases(self, encoded: list[_Item]) -> tuple[dict[ChunkId, int], list[_Item]]:
        """The releases to write now and the records for this write: the release record first."""
        # Releases of chunks whose segment is gone need no record any more.
        released = {i: s for i, s in self._unwritten.items() if s in self._segments}
        self._unwritten = dict(released)
        if not released:
            return released, encoded
        record = _item(_encode_record(KIND_RELEASE, msgpack.packb(list(released))))
        return released, [record, *encoded]

    def _note_released(self, released: dict[ChunkId, int], seq: int) -> None:
        for chunk_id in released:
            self._unwritten.pop(chunk_id, None)
        holder = self._segments.get(seq)
        if holder is not None:
            holder.release_targets.update(
                s for s in released.values() if s != seq and s in self._segments
            )

    def _write(self, items: list[_Item]) -> list[tuple[int, int]]:
        """Writes the records in order, starting segments as needed; (seq, offset) of each.

        Runs with ``_io`` held and ``_lock`` not held. One fsync per segment touched.
        """
        placed: list[tuple[int, int]] = []
        segment = self._current
        start = position = segment.size if segment is not None else 0
        group: list[bytes] = []
        for item in items:
            if segment is None or (position > 0 and position + item.size > self.segment_bytes):
                if segment is not None:
                    self._write_group(segment, group, start, position)
                segment = self._new_segment()
                start = position = 0
                group = []
            placed.append((segment.seq, position))
            group.extend(item.buffers)
            position += item.size
        assert segment is not None
        self._write_group(segment, group, start, position)
        return placed

    def _write_group(self, segment: _Segment, buffers: list[bytes], start: int, end: int) -> None:
        try:
            _write_all(self._fd, buffers)
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            # Don't leave a torn record for later appends to follow: cut it off if we can, and
            # write nothing more to this segment either way.
            try:
                os.ftruncate(self._fd, start)
                end = start
            except OSError:
                # If even fstat fails, count the whole group: overstating is the safe side.
                with contextlib.suppress(OSError):
                    end = os.fstat(self._fd).st_size
            with self._lock:
                self._bytes_used += end - segment.size
                segment.size = end
                self._close_current()
            raise
        with self._lock:
            self._bytes_used += end - start
            segment.size = end

    def _new_segment(self) -> _Segment:
        seq = self._next_seq
        self._next_seq += 1
        path = self.directory / f"seg-{seq:012d}.fwd"
        # O_EXCL: a name collision is a bug, and must never clobber a segment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        segment = _Segment(seq, path)
        with self._lock:
            self._close_current()
            self._fd = fd
            self._current = segment
            self._segments[seq] = segment
            self._busy.add(seq)
        if self.fsync:
            self._fsync_directory()  # the new file's name must survive a crash too
        return segment

    def _close_current(self) -> None:
        """Stops writing to the current segment; the next write starts a new one."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._current = None

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory)

    # --- releases ---------------------------------------------------------------------------

    def release(self, chunk_id: ChunkId, *, collect: bool = True) -> bool:
        """Marks a chunk delivered; False if the store doesn't hold it (already released).
        A segment this empties is deleted now, or with ``collect=False`` by the next blocking
        call (off the event loop)."""
        with self._lock:
            if self._state is _State.CLOSED:
                raise RuntimeError("the segment store is closed")
            entry = self._live.get(chunk_id)
            if entry is None:
                if chunk_id in self._writing:
                    self._released_early.add(chunk_id)
                    return True
                return False
            self._release(entry, collect)
            return True

    def drop_oldest(self, *, collect: bool = True) -> Chunk | None:
        """Releases the oldest live chunk and returns it, for the caller to count and log.
        ``collect`` as for `release`."""
        with self._lock:
            if self._state is _State.CLOSED:
                raise RuntimeError("the segment store is closed")
            if not self._live:
                return None
            entry = next(iter(self._live.values()))
            self._release(entry, collect)
            return entry.chunk

    def _release(self, entry: _Entry, collect: bool = True) -> None:
        self._forget(entry.chunk.chunk_id)
        self._unwritten[entry.chunk.chunk_id] = entry.seq
        if collect and self._segments[entry.seq].live == 0:
            self._collect()

    def _collect(self) -> None:
        """Deletes every segment that holds nothing live and whose release records name no
        segment still on disk. Oldest first, so deleting a segment frees its dependents in
        the same pass."""
        for segment in list(self._segments.values()):
            if (
                segment.live
                or segment is self._current
                or segment.seq in self._busy
                or any(t in self._segments for t in segment.release_targets)
            ):
                continue
            try:
                segment.path.unlink(missing_ok=True)
            except OSError as exc:  # keep it indexed; the next pass tries again
                log.warning("cannot delete buffer segment %s: %s", segment.path, exc)
                continue
            del self._segments[segment.seq]
            self._bytes_used -= segment.size

    # --- reads and end ----------------------------------------------------------------------

    def read(self, chunk_id: ChunkId) -> Chunk:
        """A live chunk with its payload, from disk, checked against its CRCs.

        Raises ``KeyError`` if the chunk is not live, `CorruptChunkError` if its record no
        longer checks out: the chunk is then released (it can never be delivered), and the
        caller counts and logs the loss.
        """
        with self._lock:
            entry = self._live.get(chunk_id)
            if entry is None:
                raise KeyError(chunk_id)
            path = self._segments[entry.seq].path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # released and deleted meanwhile
            raise KeyError(chunk_id) from None
        try:
            head = os.pread(fd, entry.head_bytes, entry.offset)
            payload = os.pread(fd, entry.chunk.size, entry.offset + entry.head_bytes)
        finally:
            os.close(fd)
        reason = _check_record(head, payload, entry)
        if reason is not None:
            with self._lock:
                if self._live.get(chunk_id) is entry:
                    self._release(entry)
            size = entry.head_bytes + entry.chunk.size
            raise CorruptChunkError(Damage(path, entry.offset, size, reason))
        return entry.chunk.with_payload(payload)

    def close(self) -> None:
        """Writes the pending releases, syncs, and deletes what is fully released."""
        with self._io:
            if self._state is _State.CLOSED:
                return
            try:
                if self._state is _State.OPEN:
                    self._commit((), [])
            finally:
                with self._lock:
                    self._close_current()
                    self._state = _State.CLOSED
                    self._collect()
            if self.fsync and self.directory.exists():
                self._fsync_directory()  # make the deletions stick

    def _check_open(self) -> None:
        if self._state is _State.NEW:
            raise RuntimeError("recover() must run before the first append")
        if self._state is _State.CLOSED:
            raise RuntimeError("the segment store is closed")
