"""FileTailer + JsonFileParser on json-file logs that a real engine writes and rotates
(``--log-opt max-size=10k --log-opt max-file=3``, with and without ``compress=true``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from forwarder.docker.jsonfile import JsonFileParser
from forwarder.tail import Block, FileTailer, Gap, JsonFileNaming, Opened, TailEvent
from tests.harness.engine import Engine
from tests.harness.polling import wait_until

pytestmark = pytest.mark.engine

LINES = 2000
# Bursts of 100 lines, 50 ms apart: about 23 rotations of 10 kB over ~1 s.
SCRIPT = (
    f"i=0; while [ $i -lt {LINES} ]; do i=$((i+1)); "
    "echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; "
    "[ $((i % 100)) = 0 ] && sleep 0.05; done; true"
)


class Reader:
    """Feeds the tailer's events to a parser per file; collects line numbers and gaps."""

    def __init__(self, tailer: FileTailer) -> None:
        self.tailer = tailer
        self.numbers: list[int] = []
        self.gaps: list[Gap] = []
        self.parser = JsonFileParser()

    def take(self, events: list[TailEvent]) -> int:
        for e in events:
            if isinstance(e, Opened):
                self.parser = JsonFileParser(e.offset)
            elif isinstance(e, Block):
                assert e.offset == self.parser.offset + self.parser.pending_bytes
                chunk = self.parser.feed(e.data)
                assert not chunk.garbled
                self.numbers += [int(line.data.split(b"-")[1]) for line in chunk.lines]
            elif isinstance(e, Gap):
                self.gaps.append(e)
        return len(events)


def kept_by_engine(directory: Path, base: str) -> list[int]:
    numbers: list[int] = []
    for f in sorted(directory.glob(base + "*"), key=lambda p: p.name, reverse=True):
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
        numbers += [int(x.data.split(b"-")[1]) for x in JsonFileParser().feed(data).lines]
    return numbers


def check(reader: Reader, kept: list[int]) -> None:
    got = reader.numbers
    assert len(got) == len(set(got)), "a line arrived twice"
    assert got == sorted(got)
    assert set(kept) <= set(got), "a line the engine kept did not arrive"
    missing = sorted(set(range(1, LINES + 1)) - set(got))
    if missing:
        assert reader.gaps, f"{len(missing)} lines lost without a gap: {missing[:5]}..."


def start(engine: Engine, compress: bool) -> tuple[str, Path]:
    if not engine.is_private:
        pytest.skip("reads the engine's files: needs the private engine")
    options = ["--log-opt", "max-size=10k", "--log-opt", "max-file=3"]
    if compress:
        options += ["--log-opt", "compress=true"]
    cid = engine.run("sh", "-c", SCRIPT, options=options)
    return cid, Path(engine.inspect(cid)["LogPath"])


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_following_across_rotations(engine: Engine, compress: bool) -> None:
    cid, log_path = start(engine, compress)
    reader = Reader(FileTailer(log_path.parent, JsonFileNaming(log_path.name), block_bytes=4096))
    exited = False

    def done() -> bool:
        nonlocal exited
        took = reader.take(reader.tailer.read())
        if not exited and engine.inspect(cid)["State"]["Status"] == "exited":
            exited = True
            return False  # one more read after the exit
        return exited and not took

    wait_until(
        done,
        timeout=60.0,
        first_interval=0.005,
        max_interval=0.01,
        what="the tailer to read every line",
    )
    engine.docker("stop", cid)  # the last compression is done when stop returns
    check(reader, kept_by_engine(log_path.parent, log_path.name))
    assert reader.numbers[-1] == LINES
    reader.tailer.close()


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_paused_reader_gets_the_kept_lines_and_reports_the_lost(
    engine: Engine, compress: bool
) -> None:
    cid, log_path = start(engine, compress)
    reader = Reader(FileTailer(log_path.parent, JsonFileNaming(log_path.name), block_bytes=512))
    wait_until(lambda: reader.take(reader.tailer.read(budget_bytes=1024)), timeout=30.0)
    engine.wait_exited(cid)  # backpressure: nothing is read while the container logs
    engine.docker("stop", cid)
    while reader.take(reader.tailer.read()):
        pass
    kept = kept_by_engine(log_path.parent, log_path.name)
    check(reader, kept)
    assert len(kept) < LINES, "the log must have rotated lines away"
    assert reader.gaps, "lines rotated away must be reported as a gap"
    assert reader.numbers[-1] == LINES
    reader.tailer.close()
