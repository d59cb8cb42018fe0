"""Rotation-aware tailing of a log file and its rotated siblings, with byte-exact positions.

Shared by the file sources (the engine's json-file logs; later the kubelet's CRI logs). A
:class:`Naming` says which names in a directory belong to the chain and in which order
(json-file: ``<id>-json.log`` is the current file, ``.1`` the newest rotated one, ``.2``
older..., ``.N.gz`` when compressed). A position is (device, inode, byte offset) plus a
fingerprint of the file's first line, which finds a file again after it was gzipped (new
inode, same content) and refuses an inode that was reused by another file.

What the engine does (moby v20.10.24 ``daemon/logger/loggerutils/logfile.go``, see
:mod:`forwarder.docker.jsonfile`): it renames, never truncates nor rewrites; a rotated file is
complete (closed before the rename); with compression ``.1`` and ``.1.gz`` coexist until the
gzip is done (``.1`` is then deleted), so ``.1`` is preferred while both exist.

The decisions (which file comes next, is this a rotation, is there a gap) are pure functions
of a listing (:func:`chain_of`, :func:`resume_at`, :func:`at_eof`); :class:`FileTailer` is
the thin I/O around them, and :class:`Watcher` says when to look again (inotify, one
instance shared by all watchers, or polling when inotify is unavailable or out of watches).

Guarantees: a file is read to its end through its open descriptor before the next one is
started (it can have been renamed, gzipped or deleted meanwhile: Linux keeps an open file
readable); the immediate successor is opened as soon as it is seen, so it survives a rotation
while its predecessor is still being read; a file that rotated away before it could be opened
is reported as a :class:`Gap` (when the chain moved on further than can be told, the gap is
reported though it may be empty: never silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, NamedTuple, Protocol

__all__ = [
    "Block",
    "ChainFile",
    "Changes",
    "Ended",
    "FileRef",
    "FileTailer",
    "Gap",
    "JsonFileNaming",
    "Naming",
    "Opened",
    "TailPosition",
    "Watcher",
    "at_eof",
    "chain_of",
    "fingerprint",
    "resume_at",
]

FINGERPRINT_BYTES: Final = 1 << 16
"""At most this much of a file's start identifies it: its first line, or this many bytes."""
BLOCK_BYTES: Final = 1 << 20
INOTIFY_RELIST_POLLS: Final = 10
"""With inotify, the directory is listed again after this many poll intervals without an
event saying it changed: a guard against events a filesystem does not deliver, at a tenth of
the polling fallback's listings (500 idle containers: 50 listings a second, not 500)."""


# ------------------------------------------------------------------------------ identities


def fingerprint(head: bytes) -> int | None:
    """The identity of a file from its first bytes: a hash of its first line (or of the first
    ``FINGERPRINT_BYTES``); ``None`` while neither is complete (the file may still grow)."""
    nl = head.find(b"\n", 0, FINGERPRINT_BYTES)
    if nl >= 0:
        return zlib.crc32(head[: nl + 1]) | (nl + 1) << 32
    if len(head) >= FINGERPRINT_BYTES:
        return zlib.crc32(head[:FINGERPRINT_BYTES]) | FINGERPRINT_BYTES << 32
    return None


class FileRef(NamedTuple):
    """One file, whatever its name now."""

    dev: int
    ino: int
    fingerprint: int | None

    def same_file(self, other: FileRef) -> bool:
        """Same inode and no contradicting fingerprint, or (a gzipped copy) same fingerprint."""
        if self.fingerprint is not None and other.fingerprint is not None:
            return self.fingerprint == other.fingerprint
        return (self.dev, self.ino) == (other.dev, other.ino)


class TailPosition(NamedTuple):
    """Where reading stopped: the file and the byte offset (uncompressed) after the last
    complete line taken."""

    dev: int
    ino: int
    fingerprint: int | None
    offset: int

    @property
    def ref(self) -> FileRef:
        return FileRef(self.dev, self.ino, self.fingerprint)


class ChainFile(NamedTuple):
    """A file of the chain as listed: its name, whether gzipped, identity and size."""

    name: str
    compressed: bool
    ref: FileRef
    size: int


# ------------------------------------------------------------------------------ naming


class Naming(Protocol):
    def order(self, name: str) -> tuple[int | str, bool] | None:
        """``(key, compressed)`` for a name of the chain (ascending key = older to newer),
        ``None`` for any other name."""
        ...


@dataclass(frozen=True)
class JsonFileNaming:
    """``<id>-json.log`` (current), ``.1``, ``.2``... (older), ``.N.gz`` (compressed)."""

    base: str

    def order(self, name: str) -> tuple[int | str, bool] | None:
        if name == self.base:
            return 0, False
        if not name.startswith(self.base + "."):
            return None
        m = _ROTATED_RE.fullmatch(name, len(self.base) + 1)
        if m is None:
            return None
        return -int(m.group(1)), m.group(2) is not None


_ROTATED_RE = re.compile(r"([1-9][0-9]*)(\.gz)?")


def chain_of(entries: Sequence[tuple[str, FileRef, int]], naming: Naming) -> list[ChainFile]:
    """The chain, oldest first, from a directory listing ``(name, ref, size)``. When a file
    and its gzipped copy both exist (compression in progress), the plain one is taken.

    A listing is not atomic: a name stat'ed before a rotation and another after it can show
    the same file twice (``<id>-json.log`` as it was, and ``.1`` or ``.1.gz`` it has become).
    A file is counted once, at its oldest name, where the rotation took it: the newer name
    belongs to a file that was not there yet when its stat ran, and the next listing (the
    rotation's events wake it) sees that one."""
    keyed: dict[int | str, ChainFile] = {}
    for name, ref, size in entries:
        order = naming.order(name)
        if order is None:
            continue
        key, compressed = order
        held = keyed.get(key)
        if held is None or (held.compressed and not compressed):
            keyed[key] = ChainFile(name, compressed, ref, size)
    chain: list[ChainFile] = []
    for k in sorted(keyed, key=_sort_key):
        f = keyed[k]
        if _find(chain, f.ref) < 0:
            chain.append(f)
    return chain


def _sort_key(key: int | str) -> tuple[int, int | str]:
    return (0, key) if isinstance(key, int) else (1, key)


def _find(chain: Sequence[ChainFile], ref: FileRef) -> int:
    for i, f in enumerate(chain):
        if f.ref.same_file(ref):
            return i
    return -1


# ------------------------------------------------------------------------------ decisions


class Start(NamedTuple):
    file: ChainFile | None
    """The file to open, ``None`` when the chain is empty."""
    offset: int
    gap: bool
    """The position's file is gone: lines after it may be lost (the caller names them)."""


def resume_at(position: TailPosition | None, chain: Sequence[ChainFile]) -> Start:
    """Where to start: the position's file at its offset if it is still there (as it was,
    renamed or gzipped), else the oldest file, with a gap."""
    if not chain:
        return Start(None, 0, position is not None)
    if position is None:
        return Start(chain[0], 0, False)
    i = _find(chain, position.ref)
    if i < 0:
        return Start(chain[0], 0, True)
    found = chain[i]
    if not found.compressed and found.size < position.offset:
        return Start(found, 0, True)  # shorter than the position: not the file we read
    return Start(found, position.offset, False)


class Step(NamedTuple):
    """What to do at the end of the file being read."""

    wait: bool
    """It is still the current file: wait for more bytes."""
    next: ChainFile | None
    """Otherwise the file to read next (``None``: nothing left, the chain is gone)."""
    gap: bool
    """Files between the one read and ``next`` may have rotated away unread."""
    successor: ChainFile | None
    """The immediate successor seen in this listing: open it now, so it outlives a rotation."""


def at_eof(reading: FileRef, chain: Sequence[ChainFile], successor: FileRef | None) -> Step:
    """The decision at the end of ``reading`` (its bytes exhausted), given a fresh listing.

    ``successor`` is the file that was seen to follow ``reading`` earlier (and is held open
    by the caller): it comes next whatever has happened to it since."""
    i = _find(chain, reading)
    if i >= 0:
        if i == len(chain) - 1:
            return Step(True, None, False, None)
        nxt = chain[i + 1]
        return Step(False, nxt, False, nxt)
    # Ours rotated out of the chain (or the directory went away).
    if successor is not None:
        j = _find(chain, successor)
        return Step(False, chain[j] if j >= 0 else None, False, None)
    if not chain:
        return Step(False, None, False, None)
    return Step(False, chain[0], True, None)


_WAIT: Final = Step(True, None, False, None)


# ------------------------------------------------------------------------------ events


class Opened(NamedTuple):
    """Reading starts in ``name`` at ``offset``; the blocks that follow are this file's."""

    name: str
    ref: FileRef
    offset: int


class Block(NamedTuple):
    """Bytes of the file last opened, at ``offset`` (uncompressed)."""

    offset: int
    data: bytes


class Gap(NamedTuple):
    """Lines may be lost between ``after`` (the file read to its end, or the resume position's
    file) and ``before`` (the file reading goes on with): a file between them may have
    rotated away unread. The caller names the time range (the last line it took, the next
    line it gets) and counts it."""

    after: str
    before: str


class Ended(NamedTuple):
    """The chain is gone (the container was removed) and every open file was read."""

    name: str


TailEvent = Opened | Block | Gap | Ended


# ------------------------------------------------------------------------------ I/O

LISTING_ATTEMPTS: Final = 3
"""A directory listing that saw a file renamed or deleted under it is made again up to this
many times (a rotation is over in well under a millisecond; the engine rotates far less often)."""


class _Moved(Exception):
    """A name listed was given to another file before its first line was read."""


class _Open:
    __slots__ = ("compressed", "name", "offset", "raw", "ref", "stream")

    def __init__(self, path: Path, file: ChainFile) -> None:
        self.name = file.name
        self.compressed = file.compressed
        self.raw: IO[bytes] = path.open("rb")
        st = os.fstat(self.raw.fileno())
        if (st.st_dev, st.st_ino) != (file.ref.dev, file.ref.ino):
            # The name was given to another file (a rotation) since it was listed.
            self.raw.close()
            raise FileNotFoundError(errno.ENOENT, "rotated since it was listed", str(path))
        self.stream: IO[bytes] = (
            gzip.GzipFile(fileobj=self.raw) if file.compressed else self.raw  # type: ignore[assignment]
        )
        self.ref = file.ref
        self.offset = 0

    def seek(self, offset: int) -> None:
        if not self.compressed:
            self.raw.seek(offset)
            self.offset = offset
            return
        while self.offset < offset:
            got = self.stream.read(min(BLOCK_BYTES, offset - self.offset))
            if not got:
                break
            self.offset += len(got)

    def read(self, size: int) -> bytes:
        try:
            data = self.stream.read(size)
        except EOFError:  # a gzip being written (the plain copy is read while both exist)
            data = b""
        self.offset += len(data)
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stream.close()
            self.raw.close()


class Changes(Protocol):
    def take(self) -> bool:
        """Whether the directory may have changed (a file created, renamed or deleted) since
        this was last asked; asking forgets it."""
        ...


def _linked(f: _Open) -> bool:
    """The open file still has a name (its link count is not 0)."""
    try:
        return os.fstat(f.raw.fileno()).st_nlink > 0
    except OSError:
        return False


class FileTailer:
    """Reads a chain of log files in a directory from a position, as :data:`TailEvent` s.

    ``read()`` returns what can be read now (up to ``budget_bytes``), never blocks on new
    bytes; ``[]`` means nothing new. Not reading (backpressure) is safe: the file being read
    and its successor are held open and are read to their end when reading resumes.

    Without ``changes`` the directory is listed at every end of the newest file (to see a
    rotation). With it (a :class:`Watcher`), the end of the newest file costs one ``fstat``:
    the directory is listed only when ``changes`` says it may have changed, or when the open
    file's link count dropped to 0 (deleted: gzipped away, or the container removed).
    """

    def __init__(
        self,
        directory: Path,
        naming: Naming,
        position: TailPosition | None = None,
        *,
        block_bytes: int = BLOCK_BYTES,
        changes: Changes | None = None,
    ) -> None:
        self.directory = directory
        self.changes = changes
        self.listings = 0
        """Directory listings made (each a ``listdir``, a ``stat`` and a first-line read per
        file of the chain)."""
        self._naming = naming
        self._position = position
        self._block = block_bytes
        self._file: _Open | None = None
        self._next: _Open | None = None  # the held successor
        self._started = False
        self._newest = False  # the file being read was the newest at the last listing
        self.ended = False
        self._fingerprints: dict[tuple[int, int, int, int], int] = {}

    def __repr__(self) -> str:
        where = f"{self._file.name}@{self._file.offset}" if self._file else "-"
        return f"<FileTailer {self.directory} {where}>"

    def close(self) -> None:
        for f in (self._file, self._next):
            if f is not None:
                f.close()
        self._file = self._next = None

    def listing(self) -> list[ChainFile]:
        """The chain as it is now. A name gone between ``listdir`` and its ``stat``, or
        given to another file before its first line was read, makes the listing start again
        (a few times, then that name is left out: the rotation's events or the next end of
        file list again)."""
        self.listings += 1
        for _ in range(LISTING_ATTEMPTS):
            entries, moved = self._list_once()
            if not moved:
                break
        return chain_of(entries, self._naming)

    def _list_once(self) -> tuple[list[tuple[str, FileRef, int]], bool]:
        entries: list[tuple[str, FileRef, int]] = []
        moved = False
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return entries, moved
        for name in names:
            order = self._naming.order(name)
            if order is None:
                continue
            try:
                st = os.stat(self.directory / name)
                fp = self._fingerprint(name, st, order[1])
            except (FileNotFoundError, _Moved):
                # Renamed or deleted since listdir: the rest may be stale (a plain .1 gone,
                # its .1.gz stat'ed while still being written, without a fingerprint).
                moved = True
                continue
            entries.append((name, FileRef(st.st_dev, st.st_ino, fp), st.st_size))
        return entries, moved

    def _fingerprint(self, name: str, st: os.stat_result, compressed: bool) -> int | None:
        """The fingerprint of the file ``st`` describes, read from that very file (the name
        may have been given to another one since: :class:`_Moved`), cached. An inode can be
        reused by a new file once the old one is deleted, so a cached plain file's first
        line is read again and compared (a short read); a gzip is never written again once
        complete (keyed by mtime and size)."""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns if compressed else 0, st.st_size * compressed)
        cached = self._fingerprints.get(key)
        if cached is not None and compressed:
            return cached
        with (self.directory / name).open("rb") as f:
            now = os.fstat(f.fileno())
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise _Moved
            if compressed:
                try:
                    with gzip.GzipFile(fileobj=f) as gz:
                        head = gz.read(FINGERPRINT_BYTES)
                except (EOFError, gzip.BadGzipFile, zlib.error):
                    return None  # a gzip still being written
            else:
                head = os.pread(f.fileno(), cached >> 32 if cached else FINGERPRINT_BYTES, 0)
                if cached is not None and fingerprint(head) == cached:
                    return cached
                if cached is not None:
                    head = os.pread(f.fileno(), FINGERPRINT_BYTES, 0)
        fp = fingerprint(head)
        if fp is not None:
            if len(self._fingerprints) > 64:
                self._fingerprints.clear()
            self._fingerprints[key] = fp
        return fp

    def _open(self, file: ChainFile) -> _Open | None:
        try:
            return _Open(self.directory / file.name, file)
        except FileNotFoundError:
            return None

    def position(self) -> TailPosition | None:
        """The file being read and the offset reached (after the last block returned)."""
        f = self._file
        if f is None:
            return self._position
        return TailPosition(f.ref.dev, f.ref.ino, f.ref.fingerprint, f.offset)

    def read(self, budget_bytes: int = 4 << 20) -> list[TailEvent]:
        events: list[TailEvent] = []
        if self.ended:
            return events
        if not self._started and not self._start(events):
            return events
        read = 0
        while read < budget_bytes:
            f = self._file
            assert f is not None
            data = f.read(self._block)
            if data:
                events.append(Block(f.offset - len(data), data))
                read += len(data)
                continue
            step = self._at_end(f)
            if step.wait:
                break
            data = f.read(self._block)  # written before the rotation we just saw
            if data:
                events.append(Block(f.offset - len(data), data))
                read += len(data)
                continue
            if not self._advance(step, events):
                break
        else:
            # Stopped mid-file: hold the successor now, in case reading pauses for long.
            if self._next is None and self._file is not None and self._may_have_moved(self._file):
                self._look(self._file)
        return events

    def _may_have_moved(self, f: _Open) -> bool:
        """Whether a listing can show something new about ``f`` and its successors."""
        if not self._newest or self.changes is None or self.changes.take():
            return True
        return not _linked(f)

    def _at_end(self, f: _Open) -> Step:
        """At the end of ``f``'s bytes: wait if it is still the newest file, else go on."""
        if not self._may_have_moved(f):
            return _WAIT
        return self._look(f)

    def _look(self, f: _Open) -> Step:
        """List the chain and decide; learn the file's fingerprint and hold its successor."""
        if f.ref.fingerprint is None and not f.compressed:
            # From the open file itself: by the time it is listed again it may be gzipped
            # and deleted, and then only its fingerprint finds it.
            with contextlib.suppress(OSError):
                fp = fingerprint(os.pread(f.raw.fileno(), FINGERPRINT_BYTES, 0))
                if fp is not None:
                    f.ref = FileRef(f.ref.dev, f.ref.ino, fp)
        chain = self.listing()
        for _ in range(LISTING_ATTEMPTS - 1):
            if _find(chain, f.ref) >= 0 or not _linked(f):
                break
            # Still linked, so still named in the directory: the listing was made while a
            # rotation renamed files (listdir's names, stat'ed after the rename).
            chain = self.listing()
        if f.ref.fingerprint is None:
            i = _find(chain, f.ref)
            if i >= 0:
                f.ref = chain[i].ref
        step = at_eof(f.ref, chain, self._next.ref if self._next else None)
        self._newest = step.wait
        if step.successor is not None and self._next is None:
            self._next = self._open(step.successor)
        return step

    def _start(self, events: list[TailEvent]) -> bool:
        chain = self.listing()
        start = resume_at(self._position, chain)
        while start.file is not None:
            opened = self._open(start.file)
            if opened is not None:
                opened.seek(start.offset)
                self._file = opened
                self._started = True
                if start.gap and self._position is not None:
                    events.append(Gap(f"inode {self._position.ino}", start.file.name))
                events.append(Opened(opened.name, opened.ref, opened.offset))
                return True
            start = resume_at(self._position, self.listing())  # it rotated meanwhile
        return False

    def _advance(self, step: Step, events: list[TailEvent]) -> bool:
        """Leave the finished file for the next one; False when there is none (ended)."""
        f = self._file
        assert f is not None
        nxt = self._next
        self._newest = False  # the next end lists (or decides again)
        if nxt is None and step.next is not None:
            nxt = self._open(step.next)
            if nxt is None:  # rotated between the listing and the open: decide again
                return True
        self._next = None
        f.close()
        if nxt is None:
            self._file = None
            self.ended = True
            events.append(Ended(f.name))
            return False
        if step.gap:
            events.append(Gap(f.name, nxt.name))
        self._file = nxt
        events.append(Opened(nxt.name, nxt.ref, 0))
        return True


# ------------------------------------------------------------------------------ noticing


_CHANGED_MASK: Final = 0x100 | 0x40 | 0x80 | 0x200 | 0x400 | 0x8000 | 0x4000
"""CREATE, MOVED_FROM, MOVED_TO, DELETE, DELETE_SELF, IGNORED, Q_OVERFLOW: the chain may have
changed. MODIFY (0x2) only says there are new bytes."""
_WATCH_MASK: Final = 0x2 | 0x100 | 0x40 | 0x80 | 0x200 | 0x400


class _Inotify:
    """The one inotify instance of an event loop, shared by its watchers: a watch per
    directory, events dispatched by watch descriptor. One instance per followed directory
    would exhaust ``fs.inotify.max_user_instances`` (128 by default) long before 500
    containers; watches are limited by ``max_user_watches`` (8,192 or more)."""

    _of_loop: dict[asyncio.AbstractEventLoop, _Inotify] = {}

    @classmethod
    def of_running_loop(cls) -> _Inotify:
        loop = asyncio.get_running_loop()
        made = cls._of_loop.get(loop)
        if made is None:
            made = cls._of_loop[loop] = cls(loop)
        return made

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from inotify_simple import INotify

        self._loop = loop
        self._inotify = INotify(nonblocking=True)
        self._fd = self._inotify.fileno()
        self._watchers: dict[int, set[Watcher]] = {}
        loop.add_reader(self._fd, self._readable)

    def add(self, watcher: Watcher) -> int:
        """Watch the watcher's directory; OSError (ENOSPC: out of watches) when it can't."""
        try:
            wd: int = self._inotify.add_watch(str(watcher.directory), _WATCH_MASK)
        except OSError:
            if not self._watchers:
                self._close()
            raise
        self._watchers.setdefault(wd, set()).add(watcher)
        return wd

    def remove(self, watcher: Watcher, wd: int) -> None:
        held = self._watchers.get(wd)
        if held is not None:
            held.discard(watcher)
            if not held:
                del self._watchers[wd]
                with contextlib.suppress(OSError):  # gone already (IGNORED)
                    self._inotify.rm_watch(wd)
        if not self._watchers:
            self._close()

    def _close(self) -> None:
        self._of_loop.pop(self._loop, None)
        self._loop.remove_reader(self._fd)
        self._inotify.close()

    def _readable(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except OSError:
            return
        for event in events:
            if event.mask & 0x4000:  # Q_OVERFLOW: events were lost, for any directory
                for every in self._watchers.values():
                    for w in every:
                        w.woken(True)
                continue
            held = self._watchers.get(event.wd)
            if not held:
                continue
            changed = bool(event.mask & _CHANGED_MASK)
            for w in tuple(held):
                w.woken(changed)
            if event.mask & 0x8000:  # IGNORED: the kernel removed the watch (rmdir)
                del self._watchers[event.wd]
                for w in held:
                    w.unwatched()
        if not self._watchers:
            self._close()


class Watcher:
    """Wakes a follower when its directory changes, and tells its tailer (as
    :class:`Changes`) when to list the directory again.

    With inotify (the loop's one shared instance, :class:`_Inotify`): woken by any event in
    the directory; a listing is due after a create, rename or delete, or after
    ``INOTIFY_RELIST_POLLS`` poll intervals without one. Without (inotify missing, out of
    watches or instances, or the watch removed): polling, woken and a listing due every
    ``poll_interval`` seconds. With inotify a wake is also forced every ``poll_interval``
    (a read that finds nothing costs one ``read`` and one ``fstat``, no listing)."""

    def __init__(self, directory: Path, poll_interval: float = 1.0) -> None:
        self.directory = directory
        self.poll_interval = poll_interval
        self._event = asyncio.Event()
        self._changed = True  # whatever happened before the watch began
        self._listed = time.monotonic()
        self._inotify: _Inotify | None = None
        self._wd = -1
        self.mode = "poll"
        try:
            inotify = _Inotify.of_running_loop()
            self._wd = inotify.add(self)
        except ImportError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENOENT, errno.ENOSYS):
                raise
            return
        self._inotify = inotify
        self.mode = "inotify"

    def woken(self, changed: bool) -> None:
        """An event in the directory (from the shared inotify instance)."""
        if changed:
            self._changed = True
        self._event.set()

    def unwatched(self) -> None:
        """The kernel removed the watch (the directory is gone): poll from now on."""
        self._inotify = None
        self.mode = "poll"

    def take(self) -> bool:
        now = time.monotonic()
        every = self.poll_interval * (INOTIFY_RELIST_POLLS if self.mode == "inotify" else 1)
        if self._changed or now - self._listed >= every:
            self._changed = False
            self._listed = now
            return True
        return False

    async def wait(self) -> None:
        """Until something changed (inotify) or ``poll_interval`` passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), self.poll_interval)
        self._event.clear()

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.remove(self, self._wd)
            self._inotify = None


async def follow(
    tailer: FileTailer,
    *,
    poll_interval: float = 1.0,
    watcher_factory: Callable[[Path, float], Watcher] = Watcher,
) -> AsyncIterator[list[TailEvent]]:
    """The tailer's events as they come, a batch per read; ends after :class:`Ended`.

    Not iterating is backpressure: nothing is read meanwhile, and files rotated while
    waiting are read (or reported as a :class:`Gap`) when iteration resumes."""
    watcher = watcher_factory(tailer.directory, poll_interval)
    tailer.changes = watcher
    try:
        while not tailer.ended:
            events = tailer.read()
            if events:
                yield events
            else:
                await watcher.wait()
    finally:
        watcher.close()
        tailer.close()


async def wait_first(*awaitables: Awaitable[Any]) -> list[asyncio.Future[Any]]:
    """Until one of ``awaitables`` is done; the others are cancelled (and their end awaited).
    Returns them all, in order: a finished one is ``done()`` and not ``cancelled()``."""
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return tasks
