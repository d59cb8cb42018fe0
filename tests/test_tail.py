"""The tailer's decisions on fake listings, and its I/O on a directory rotated as the engine
does (loggerutils/logfile.go: shift .N, rename to .1, new file; gzip .1 to .1.gz)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from forwarder.tail import (
    Block,
    ChainFile,
    Ended,
    FileRef,
    FileTailer,
    Gap,
    JsonFileNaming,
    Opened,
    TailEvent,
    TailPosition,
    at_eof,
    chain_of,
    fingerprint,
    resume_at,
)

BASE = "c-json.log"
NAMING = JsonFileNaming(BASE)


def ref(ino: int, fp: int | None = None) -> FileRef:
    return FileRef(1, ino, fp if fp is not None else ino * 1000)


def cf(name: str, ino: int, size: int = 100, fp: int | None = None) -> ChainFile:
    return ChainFile(name, name.endswith(".gz"), ref(ino, fp), size)


# ------------------------------------------------------------------------------ pure


def test_chain_order_and_plain_preferred_while_compressing() -> None:
    listing = [
        (n, ref(i), 10)
        for i, n in enumerate(
            [
                BASE,
                "c-json.log.2.gz",
                "c-json.log.1",
                "c-json.log.1.gz",
                "hostconfig.json",
                "c-json.log.tmp",
                "c-json.log.10",
            ],
            start=1,
        )
    ]
    chain = chain_of(listing, NAMING)
    assert [f.name for f in chain] == ["c-json.log.10", "c-json.log.2.gz", "c-json.log.1", BASE]


def test_resume_at_the_position_as_it_was_renamed_or_gzipped() -> None:
    pos = TailPosition(1, 7, 7000, 50)
    assert resume_at(pos, [cf(BASE, 7)]) == (cf(BASE, 7), 50, False)
    assert resume_at(pos, [cf(BASE + ".1", 7), cf(BASE, 8)]).file == cf(BASE + ".1", 7)
    gz = cf(BASE + ".1.gz", 9, fp=7000)  # a new inode, the same first line
    assert resume_at(pos, [gz, cf(BASE, 8)]) == (gz, 50, False)


def test_resume_when_the_file_is_gone_starts_oldest_with_a_gap() -> None:
    pos = TailPosition(1, 7, 7000, 50)
    chain = [cf(BASE + ".1", 8), cf(BASE, 9)]
    assert resume_at(pos, chain) == (chain[0], 0, True)
    # The inode was reused by another file: not ours.
    assert resume_at(pos, [cf(BASE, 7, fp=1)]) == (cf(BASE, 7, fp=1), 0, True)
    assert resume_at(None, chain) == (chain[0], 0, False)
    assert resume_at(pos, []) == (None, 0, True)


def test_resume_in_a_file_shorter_than_the_position_is_a_gap() -> None:
    assert resume_at(TailPosition(1, 7, 7000, 500), [cf(BASE, 7, size=10)]).gap


def test_at_eof_waits_on_the_current_file() -> None:
    step = at_eof(ref(7), [cf(BASE + ".1", 6), cf(BASE, 7)], None)
    assert step.wait
    assert step.next is None


def test_at_eof_after_a_rotation_goes_to_the_successor() -> None:
    chain = [cf(BASE + ".2", 6), cf(BASE + ".1", 7), cf(BASE, 8)]
    step = at_eof(ref(7), chain, None)
    assert (step.wait, step.next, step.gap, step.successor) == (False, chain[2], False, chain[2])
    # Several rotations while paused: still the immediate successor, oldest first.
    assert at_eof(ref(6), chain, None).next == chain[1]


def test_at_eof_ours_gone_uses_the_held_successor_even_if_it_is_gone_too() -> None:
    chain = [cf(BASE + ".2", 10), cf(BASE + ".1", 11), cf(BASE, 12)]
    assert at_eof(ref(7), chain, ref(10)) == (False, chain[0], False, None)
    assert at_eof(ref(7), chain, ref(9)) == (False, None, False, None)  # caller has it open


def test_at_eof_ours_gone_without_a_known_successor_is_a_gap() -> None:
    chain = [cf(BASE + ".2", 10), cf(BASE, 12)]
    assert at_eof(ref(7), chain, None) == (False, chain[0], True, None)


def test_at_eof_the_chain_is_gone() -> None:
    assert at_eof(ref(7), [], None) == (False, None, False, None)


def test_fingerprint_needs_a_whole_first_line() -> None:
    assert fingerprint(b"abc") is None
    assert fingerprint(b"abc\nde") == fingerprint(b"abc\nxyz")
    assert fingerprint(b"abc\n") != fingerprint(b"abd\n")


# ------------------------------------------------------------------------------ I/O


class Writer:
    """Writes numbered lines into ``dir/BASE`` and rotates as the engine does."""

    def __init__(self, directory: Path, max_files: int, compress: bool) -> None:
        self.dir = directory
        self.max_files = max_files
        self.compress = compress
        self.n = 0
        (directory / BASE).touch()

    def write(self, count: int) -> None:
        with (self.dir / BASE).open("ab") as f:
            for _ in range(count):
                self.n += 1
                f.write(b"line %06d\n" % self.n)

    def rotate(self) -> None:
        ext = ".gz" if self.compress else ""
        path = self.dir / BASE
        last = Path(f"{path}.{self.max_files - 1}{ext}")
        last.unlink(missing_ok=True)
        for i in range(self.max_files - 1, 1, -1):
            src = Path(f"{path}.{i - 1}{ext}")
            if src.exists():
                src.rename(f"{path}.{i}{ext}")
        path.rename(f"{path}.1")
        path.touch()
        if self.compress:
            one = Path(f"{path}.1")
            Path(f"{one}.gz").write_bytes(gzip.compress(one.read_bytes()))
            one.unlink()


def numbers(events: list[TailEvent]) -> list[int]:
    data = b"".join(e.data for e in events if isinstance(e, Block))
    return [int(line.split()[1]) for line in data.splitlines()]


def test_follow_across_rotations_nothing_lost_nothing_twice(tmp_path: Path) -> None:
    for compress in (False, True):
        d = tmp_path / str(compress)
        d.mkdir()
        w = Writer(d, max_files=3, compress=compress)
        tailer = FileTailer(d, NAMING, block_bytes=64)
        events: list[TailEvent] = []
        for _ in range(10):
            w.write(7)
            events += tailer.read()
            w.rotate()
            w.write(3)
        events += tailer.read()
        assert numbers(events) == list(range(1, w.n + 1)), compress
        assert not any(isinstance(e, Gap) for e in events)
        tailer.close()


def test_paused_for_two_rotations_reads_the_chain_oldest_first(tmp_path: Path) -> None:
    for compress in (False, True):
        d = tmp_path / str(compress)
        d.mkdir()
        w = Writer(d, max_files=3, compress=compress)
        tailer = FileTailer(d, NAMING, block_bytes=64)
        w.write(5)
        first = tailer.read(budget_bytes=30)  # stops mid-file
        w.write(5)
        w.rotate()
        w.write(5)
        w.rotate()
        w.write(5)
        events = first + tailer.read()
        assert numbers(events) == list(range(1, 21))
        assert not any(isinstance(e, Gap) for e in events)


def test_paused_while_the_file_and_its_successor_rotate_away(tmp_path: Path) -> None:
    d = tmp_path
    w = Writer(d, max_files=2, compress=False)
    tailer = FileTailer(d, NAMING, block_bytes=64)
    w.write(5)
    events = tailer.read(budget_bytes=30)  # mid-file: the reader holds it
    w.write(5)
    w.rotate()
    w.write(5)  # the successor: seen when reading resumes? no: it rotates away first
    w.rotate()
    w.write(5)
    w.rotate()  # the file read first and the next one are deleted now
    w.write(5)
    events += tailer.read()
    got = numbers(events)
    # The open file is read to its end; the lines in between are reported as a gap.
    assert got[:10] == list(range(1, 11))
    assert got[10:] == list(range(16, 26))
    gaps = [e for e in events if isinstance(e, Gap)]
    assert gaps == [Gap(BASE, BASE + ".1")]


def test_resume_at_a_position_after_compression(tmp_path: Path) -> None:
    w = Writer(tmp_path, max_files=3, compress=True)
    w.write(10)
    tailer = FileTailer(tmp_path, NAMING)
    events = tailer.read()
    # Stop after line 4: the position is at its end.
    opened = events[0]
    assert isinstance(opened, Opened)
    pos = TailPosition(opened.ref.dev, opened.ref.ino, opened.ref.fingerprint, 4 * 12)
    tailer.close()
    w.rotate()
    w.write(3)
    again = FileTailer(tmp_path, NAMING, pos)
    events = again.read()
    assert numbers(events) == list(range(5, 14))
    assert isinstance(events[0], Opened)
    assert events[0].name == BASE + ".1.gz"
    assert events[0].offset == 4 * 12


def test_a_removed_directory_is_read_to_the_end_then_ended(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    w = Writer(d, max_files=3, compress=False)
    w.write(5)
    tailer = FileTailer(d, NAMING, block_bytes=24)
    events = tailer.read(budget_bytes=24)
    w.write(5)
    for f in d.iterdir():
        f.unlink()
    os.rmdir(d)
    events += tailer.read()
    assert numbers(events) == list(range(1, 11))
    assert isinstance(events[-1], Ended)
    assert tailer.ended


def test_follow_wakes_on_inotify_and_ends_with_the_directory(tmp_path: Path) -> None:
    import asyncio

    from forwarder.tail import Watcher, follow

    d = tmp_path / "c"
    d.mkdir()
    w = Writer(d, max_files=3, compress=False)
    modes: list[str] = []

    def watcher(directory: Path, interval: float) -> Watcher:
        made = Watcher(directory, interval)
        modes.append(made.mode)
        return made

    async def run() -> list[TailEvent]:
        events: list[TailEvent] = []
        # A 60 s poll interval: only inotify can wake it in time.
        stream = follow(FileTailer(d, NAMING), poll_interval=60.0, watcher_factory=watcher)
        async with asyncio.timeout(10.0):
            w.write(3)
            async for batch in stream:
                events += batch
                if numbers(events) == [1, 2, 3]:
                    w.rotate()
                    w.write(2)
                if numbers(events) == [1, 2, 3, 4, 5] and d.exists():
                    for f in d.iterdir():
                        f.unlink()
                    d.rmdir()
        return events

    events = asyncio.run(run())
    assert modes == ["inotify"]
    assert numbers(events) == [1, 2, 3, 4, 5]
    assert isinstance(events[-1], Ended)


# ------------------------------------------------------------------------------ rotation races


def test_chain_counts_a_file_listed_twice_once_at_its_oldest_name() -> None:
    # The current file stat'ed before a rotation, its new name (or gzipped copy) after it.
    for older in (BASE + ".1", BASE + ".1.gz"):
        a = ref(7, fp=7000) if older.endswith(".1") else ref(9, fp=7000)
        listing = [(BASE + ".2.gz", ref(5), 10), (older, a, 10), (BASE, ref(7, fp=7000), 10)]
        chain = chain_of(listing, NAMING)
        assert [f.name for f in chain] == [BASE + ".2.gz", older]


class RotatingInTheListing:
    """``os`` for the tailer, rotating the directory once after ``BASE`` was stat'ed and
    fingerprinted (it is listed first), and before (or just after) the next name is stat'ed:
    then the first line read by that name is another file's."""

    def __init__(self, writer: Writer, after_stat: bool) -> None:
        self.writer = writer
        self.after_stat = after_stat
        self.armed = True

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def listdir(self, path: Path) -> list[str]:
        return sorted(os.listdir(path), key=lambda n: n != BASE)

    def stat(self, path: Path) -> os.stat_result:
        st = os.stat(path) if self.after_stat else None
        if self.armed and Path(path).name != BASE:
            self.armed = False
            self.writer.rotate()
            self.writer.write(5)
        return st or os.stat(path)


@pytest.mark.parametrize("after_stat", [False, True], ids=["before-stat", "after-stat"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_a_rotation_in_the_middle_of_a_listing_reads_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compress: bool, after_stat: bool
) -> None:
    """The engine rotates (and gzips) in the middle of a listing: after the stat of
    ``<id>-json.log``, the listing shows the file read so far twice, and its name is the new
    file's by the time it is opened; after the stat of ``.1`` (``.1.gz``), its first line,
    read by name, is the newer file's (and must not become the older one's fingerprint)."""
    import forwarder.tail as tail

    w = Writer(tmp_path, max_files=3, compress=compress)
    w.write(5)
    w.rotate()
    w.write(5)
    tailer = FileTailer(tmp_path, NAMING, block_bytes=64)
    events = tailer.read()
    w.write(5)
    racing = RotatingInTheListing(w, after_stat)
    monkeypatch.setattr(tail, "os", racing)
    events += tailer.read()
    monkeypatch.undo()
    assert not racing.armed
    events += tailer.read()
    for _ in range(3):
        w.write(5)
        w.rotate()
        events += tailer.read()
    assert numbers(events) == list(range(1, 36))
    tailer.close()


def test_a_file_renamed_over_a_listed_name_lends_it_no_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.1.gz`` is stat'ed, then rotated to ``.2.gz`` and the newer file gzipped to ``.1.gz``
    before its first line is read by name: that first line is not the stat'ed file's (else
    the older file is taken for the newer one, read in its place or skipped)."""
    import forwarder.tail as tail

    w = Writer(tmp_path, max_files=3, compress=True)
    w.write(5)
    w.rotate()
    w.write(5)
    racing = RotatingInTheListing(w, after_stat=True)
    monkeypatch.setattr(tail, "os", racing)
    tailer = FileTailer(tmp_path, NAMING, block_bytes=64)
    events = tailer.read()
    monkeypatch.undo()
    assert not racing.armed
    for _ in range(3):
        w.write(5)
        w.rotate()
        events += tailer.read()
    assert numbers(events) == list(range(1, 31))
    assert not any(isinstance(e, Gap) for e in events)
    tailer.close()


class CompressingAfterListdir:
    """``os`` for the tailer: right after ``listdir``, the engine rotates and starts gzipping
    ``.1`` (``.1.gz`` half written, ``.1`` still there): listdir's names are stale."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.armed = True

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def listdir(self, path: Path) -> list[str]:
        names = os.listdir(path)
        if self.armed:
            self.armed = False
            base = self.dir / BASE
            Path(f"{base}.1.gz").rename(f"{base}.2.gz")
            base.rename(f"{base}.1")
            base.touch()
            whole = gzip.compress(Path(f"{base}.1").read_bytes())
            Path(f"{base}.1.gz").write_bytes(whole[: len(whole) // 2])
        return names


def test_a_listing_made_while_the_engine_rotates_does_not_lose_the_open_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """listdir saw ``<id>-json.log`` and the old ``.1.gz``; by their stat, the file being
    read is ``.1`` (not listed) and ``.1.gz`` is a gzip without a first line yet: the file
    read is still linked, so still named, and is looked for again rather than taken as
    rotated away (a gap, and the chain read again from its oldest file)."""
    import forwarder.tail as tail

    w = Writer(tmp_path, max_files=3, compress=True)
    w.write(5)
    w.rotate()
    w.write(5)
    tailer = FileTailer(tmp_path, NAMING, block_bytes=64)
    events = tailer.read()
    racing = CompressingAfterListdir(tmp_path)
    monkeypatch.setattr(tail, "os", racing)
    events += tailer.read()
    monkeypatch.undo()
    assert not racing.armed
    one = tmp_path / (BASE + ".1")  # the engine finishes the compression
    Path(f"{one}.gz").write_bytes(gzip.compress(one.read_bytes()))
    one.unlink()
    w.write(5)
    events += tailer.read()
    assert numbers(events) == list(range(1, 16))
    assert not any(isinstance(e, Gap) for e in events)
    tailer.close()


# ------------------------------------------------------------------------------ listing less


class Flag:
    def __init__(self) -> None:
        self.changed = False

    def take(self) -> bool:
        changed, self.changed = self.changed, False
        return changed


def test_the_end_of_the_newest_file_lists_only_after_a_change(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    w = Writer(d, max_files=3, compress=False)
    flag = Flag()
    tailer = FileTailer(d, NAMING, changes=flag)
    w.write(5)
    events = tailer.read()
    listed = tailer.listings
    for _ in range(20):
        w.write(1)
        events += tailer.read()
        events += tailer.read()
    assert tailer.listings == listed, "no change, no listing"
    w.rotate()  # a rename: the open file is still linked
    w.write(2)
    events += tailer.read()
    assert numbers(events) == list(range(1, 26))
    flag.changed = True  # the watcher saw the rename
    events += tailer.read()
    assert numbers(events) == list(range(1, 28))
    assert tailer.listings > listed
    tailer.close()


def test_a_deleted_open_file_is_noticed_without_a_change_event(tmp_path: Path) -> None:
    # Compression deletes the rotated plain file: its link count drops to 0.
    d = tmp_path / "gzip"
    d.mkdir()
    w = Writer(d, max_files=3, compress=True)
    tailer = FileTailer(d, NAMING, changes=Flag())
    w.write(5)
    events = tailer.read()
    w.rotate()
    w.write(2)
    events += tailer.read()
    assert numbers(events) == list(range(1, 8))
    tailer.close()


def test_one_inotify_instance_watches_more_directories_than_instances_allow(
    tmp_path: Path,
) -> None:
    """``fs.inotify.max_user_instances`` is 128 by default: 200 followed containers must
    still be watched with inotify, each woken by its own directory only."""
    import asyncio

    from forwarder.tail import Watcher

    dirs = [tmp_path / f"c{i}" for i in range(200)]
    for d in dirs:
        d.mkdir()

    async def run() -> tuple[list[str], list[bool]]:
        watchers = [Watcher(d, poll_interval=60.0) for d in dirs]
        try:
            for w in watchers:
                w.take()  # forget "whatever happened before the watch began"
            (dirs[150] / BASE).write_bytes(b"x\n")
            async with asyncio.timeout(10.0):
                await watchers[150].wait()
            await asyncio.sleep(0)  # let any other (wrong) wake-up be dispatched
            return [w.mode for w in watchers], [w.take() for w in watchers]
        finally:
            for w in watchers:
                w.close()

    modes, changed = asyncio.run(run())
    assert modes == ["inotify"] * 200
    assert changed == [i == 150 for i in range(200)]
