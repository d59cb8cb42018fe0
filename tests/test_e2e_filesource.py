"""The json-file source end to end: a real engine writes and rotates the files, `forwarder run`
reads them from disk, real Forward receivers count what arrives.

The oracle is what the engine kept: its own files at the end of each test (read with the
project's parser), or the lines a container printed when nothing rotated.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.docker.jsonfile import JsonFileParser
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver

pytestmark = pytest.mark.engine

MakeCollector = Callable[..., CollectorProcess]
MakeReceiver = Callable[..., ForwardReceiver]

PAD = "x" * 80
# Numbered lines of about 90 bytes (about 150 in the file), in batches, until /tmp/stop.
NUMBERED = (
    "b=0; while [ $b -lt {batches} ]; do seq $((b*{per}+1)) $((b*{per}+{per})) | "
    f"sed 's/^/n/; s/$/-{PAD}/'; "
    "b=$((b+1)); sleep {pause}; done; echo end; sleep 600"
)
ROTATE = ["--log-opt", "max-size=100k", "--log-opt", "max-file=3"]

Line = tuple[int, str]


def logs(records: list[Any], cid: str) -> list[dict[str, Any]]:
    return [
        {"time_ns": r["time_ns"], **r["record"]}
        for r in records
        if r["record"]["container_id"] == cid and "log" in r["record"]
    ]


def has_line(cid: str, text: str) -> Callable[[list[Any]], bool]:
    return lambda records: any(r["log"] == text for r in logs(records, cid))


def at_least(cid: str, n: int) -> Callable[[list[Any]], bool]:
    return lambda records: len(numbers(records, cid)) >= n


def kept_by_engine(engine: Engine, cid: str) -> list[Line]:
    """The lines in the engine's files now, oldest file first."""
    path = Path(engine.inspect(cid)["LogPath"])
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]

    def age(p: Path) -> int:
        m = re.fullmatch(re.escape(path.name) + r"(?:\.(\d+))?(\.gz)?", p.name)
        return int(m.group(1) or 0) if m else -1

    lines: list[Line] = []
    seen: set[int] = set()
    for f in sorted(files, key=age, reverse=True):
        n = age(f)
        if n < 0 or n in seen:  # ".1" and ".1.gz" while compressing: the same lines
            continue
        seen.add(n)
        data = f.read_bytes()
        if f.suffix == ".gz":
            data = gzip.decompress(data)
        lines += [(x.ts_ns, x.data.decode()) for x in JsonFileParser().feed(data).lines]
    return lines


def tally(records: list[Any], cid: str, expected: list[Line]) -> tuple[int, int]:
    got = Counter((r["time_ns"], r["log"]) for r in logs(records, cid))
    want = Counter(expected)
    lost = sum((want - got).values())
    duplicated = sum(n - 1 for n in got.values() if n > 1)
    print(f"\n{len(expected)} lines kept, lost {lost}, duplicated {duplicated}")
    return lost, duplicated


def numbers(records: list[Any], cid: str) -> list[int]:
    return [int(r["log"][1:].split("-")[0]) for r in logs(records, cid) if r["log"][0] == "n"]


def test_both_sources_ship_identical_records(
    engine: Engine,
    make_forward_receiver: MakeReceiver,
    make_collector: MakeCollector,
    tmp_path: Path,
) -> None:
    mixed = engine.run(
        "sh",
        "-c",
        "i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo out-$i; echo err-$i >&2; done; "
        "head -c 40000 /dev/zero | tr '\\0' o; echo; "
        "head -c 40000 /dev/zero | tr '\\0' e >&2; echo >&2; "
        "printf 'bad-\\377\\376-utf8\\n'; echo end; sleep 600",
    )
    tty = engine.run("sh", "-c", "echo tty-1; echo tty-2; echo tty-3 >&2; sleep 600", tty=True)
    got: dict[str, list[Any]] = {}
    for source in ("api", "file"):
        receiver = make_forward_receiver()
        collector = make_collector(
            receiver.address,
            docker={"log_source": source},
            state={"dir": str(tmp_path / f"state-{source}")},
        )
        got[source] = receiver.wait_for(
            lambda rs: len(logs(rs, mixed)) >= 404 and len(logs(rs, tty)) >= 3, timeout=60
        )
        follows = [line for line in collector.log().splitlines() if ": following" in line]
        assert len(follows) == 2
        assert all(
            line.endswith("(api)" if source == "api" else "-json.log)") for line in follows
        ), follows
        collector.stop()
    for cid in (mixed, tty):
        for stream in ("stdout", "stderr"):
            via_api = [r for r in logs(got["api"], cid) if r["source"] == stream]
            via_file = [r for r in logs(got["file"], cid) if r["source"] == stream]
            assert via_file == via_api
    file_logs = logs(got["file"], mixed)
    assert len(file_logs) == 404
    assert {"o" * 40000, "e" * 40000, "bad-\ufffd\ufffd-utf8", "end"} <= {
        r["log"] for r in file_logs
    }
    assert [r["log"] for r in logs(got["file"], tty)] == ["tty-1", "tty-2", "tty-3"]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_rotation_while_following_loses_and_repeats_nothing(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector, compress: bool
) -> None:
    collector = make_collector(forward_receiver.address, docker={"log_source": "file"})
    options = [*ROTATE, "--log-opt", f"compress={str(compress).lower()}"]
    # 9,000 lines (~1.3 MB in the files, ~13 rotations) over about 3 s.
    cid = engine.run("sh", "-c", NUMBERED.format(batches=30, per=300, pause=0.1), options=options)
    records = forward_receiver.wait_for(has_line(cid, "end"), timeout=60)
    assert numbers(records, cid) == list(range(1, 9001))
    assert "rotated away" not in collector.log()
    assert tally(records, cid, kept_by_engine(engine, cid)) == (0, 0)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("away", ["receiver", "collector"])
def test_rotation_while_away_reads_the_chain_and_names_what_was_lost(
    engine: Engine,
    forward_receiver: ForwardReceiver,
    make_collector: MakeCollector,
    compress: bool,
    away: str,
) -> None:
    collector = make_collector(
        forward_receiver.address,
        docker={"log_source": "file"},
        # A small memory buffer: with the receiver away, the follower soon stops reading.
        output={"buffer_limit": "64KiB", "chunk_limit": "16KiB"},
        buffer={"mode": "memory"},
    )
    options = [*ROTATE, "--log-opt", f"compress={str(compress).lower()}"]
    line = f"sed 's/^/n/; s/$/-{PAD}/'"
    script = (
        f"seq 1 300 | {line}; while [ ! -e /tmp/go ]; do sleep 0.05; done; "
        f"b=1; while [ $b -lt 30 ]; do seq $((b*300+1)) $((b*300+300)) | {line}; "
        "b=$((b+1)); sleep 0.05; done; echo end; sleep 600"
    )
    cid = engine.run("sh", "-c", script, options=options)
    forward_receiver.wait_for(lambda rs: len(numbers(rs, cid)) >= 300, timeout=30)
    if away == "receiver":
        forward_receiver.stop()
    else:
        collector.stop()
    engine.docker("exec", cid, "touch", "/tmp/go")
    # Wait until the container is done: 9,000 lines, far more than 3 files of 100 kB keep.
    wait_until(lambda: b"end" in engine.logs_api_bytes(cid, tail=1), timeout=60, what="all lines")
    if away == "receiver":
        forward_receiver.start()
    else:
        collector.start()
    records = forward_receiver.wait_for(has_line(cid, "end"), timeout=60)
    lost, duplicated = tally(records, cid, kept_by_engine(engine, cid))
    assert lost == 0
    assert duplicated <= 300  # only what was sent and not acked when the receiver went
    warnings = [line for line in collector.all_logs().splitlines() if "rotated away" in line]
    assert warnings, collector.all_logs()[-3000:]
    assert all(cid[:12] in line for line in warnings)
    got = set(numbers(records, cid))
    assert max(got) == 9000
    assert len(got) < 9000  # lines were lost to rotation, and said so above


def test_switching_log_source_between_runs_loses_and_repeats_nothing(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    cid = engine.run("sh", "-c", NUMBERED.format(batches=60, per=100, pause=0.1))
    collectors = [
        make_collector(forward_receiver.address, start=False, docker={"log_source": source})
        for source in ("api", "file", "api", "file")
    ]
    for n, collector in enumerate(collectors[:-1]):
        collector.start()
        forward_receiver.wait_for(at_least(cid, 1000 * (n + 1)), 30)
        collector.stop()
    collectors[-1].start()
    records = forward_receiver.wait_for(has_line(cid, "end"), timeout=60)
    assert numbers(records, cid) == list(range(1, 6001))


def test_a_container_removed_while_its_file_is_read(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    collector = make_collector(
        forward_receiver.address,
        docker={"log_source": "file"},
        output={"buffer_limit": "64KiB", "chunk_limit": "16KiB"},
        buffer={"mode": "memory"},
    )
    cid = engine.run("sh", "-c", "echo first; sleep 1; seq 1 5000 | sed 's/^/n/'; echo end")
    forward_receiver.wait_for(has_line(cid, "first"), timeout=30)
    forward_receiver.stop()  # the follower pauses with most of the file unread
    engine.wait_exited(cid)
    engine.rm(cid)
    forward_receiver.start()
    records = forward_receiver.wait_for(has_line(cid, "end"), timeout=60)
    assert sorted(set(numbers(records, cid))) == list(range(1, 5001))
    assert "rotated away" not in collector.log()
