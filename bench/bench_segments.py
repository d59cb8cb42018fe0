"""Throughput of the disk buffer's segment store (forwarder/segments.py).

    python bench/bench_segments.py [--dir DIR] [--seconds 3] [--recover-mib 200]

Prints MB/s and chunks/s for: append with an fsync per chunk, append_many in groups of 8
(one fsync per group), the recovery scan of ~200 MiB (page cache warm: it measures the scan
and CRC work, not the disk), and reading every recovered chunk back. Write cases run for
``--seconds`` each, with 1 MiB chunks (the default chunk_limit) and 16 KiB chunks (a quiet
host's flushes). ``--dir`` should sit on the disk the state directory uses; the default is a
temporary directory. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forwarder.chunks import Chunk, ChunkId  # noqa: E402
from forwarder.records import ContainerId, Position  # noqa: E402
from forwarder.segments import SegmentStore  # noqa: E402

MIB = 1 << 20
CONTAINER = ContainerId("f" * 64)


def make_chunks(count: int, size: int, prefix: str) -> list[Chunk]:
    # A few distinct random payloads (incompressible, like gzip chunks), shared to save time.
    payloads = [os.urandom(size) for _ in range(4)]
    return [
        Chunk.of(
            ChunkId(f"{prefix}-{i}"),
            "docker.bench",
            payloads[i % 4],
            size // 110,
            {CONTAINER: Position(1_700_000_000_000_000_000 + i, 1)},
        )
        for i in range(count)
    ]


def report(label: str, chunks: int, payload_bytes: int, seconds: float) -> None:
    print(
        f"{label:<44} {payload_bytes / MIB / seconds:9.1f} MB/s "
        f"{chunks / seconds:10.0f} chunks/s  ({chunks} chunks in {seconds:.2f} s)"
    )


def bench_append(directory: Path, size: int, group: int, seconds: float) -> None:
    store = SegmentStore(directory, max_bytes=64 << 30)
    store.recover()
    pool = make_chunks(max(group, 8), size, "warm")
    store.append_many(pool[:group])  # the first segment's creation is not the steady state
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = [
            Chunk.of(ChunkId(f"c{done + k}"), c.tag, c.payload, c.count, c.positions)
            for k, c in enumerate(pool[:group])
        ]
        if group == 1:
            store.append(batch[0])
        else:
            store.append_many(batch)
        done += group
        # Keep the directory small, as acks would: release what is written.
        for c in batch:
            store.release(c.chunk_id)
    store.close()
    how = "append, fsync per chunk" if group == 1 else f"append_many, groups of {group}"
    report(f"{how}, {size // 1024} KiB chunks", done, done * size, elapsed)


def bench_recover(directory: Path, size: int, total_mib: int) -> None:
    count = total_mib * MIB // size
    store = SegmentStore(directory, max_bytes=64 << 30, fsync=False)
    store.recover()
    chunks = make_chunks(count, size, "r")
    for i in range(0, count, 64):
        store.append_many(chunks[i : i + 64])
    store.close()
    del chunks

    start = time.perf_counter()
    store = SegmentStore(directory, max_bytes=64 << 30)
    metas, damage = store.recover()
    elapsed = time.perf_counter() - start
    assert len(metas) == count
    assert not damage
    on_disk = store.bytes_used
    print(
        f"{'recover scan, ' + str(size // 1024) + ' KiB chunks':<44} "
        f"{on_disk / MIB / elapsed:9.1f} MB/s {count / elapsed:10.0f} chunks/s  "
        f"({on_disk / MIB:.0f} MiB in {elapsed:.2f} s)"
    )

    start = time.perf_counter()
    for meta in metas:
        store.read(meta.chunk_id)
    elapsed = time.perf_counter() - start
    report(f"read back, {size // 1024} KiB chunks", count, count * size, elapsed)
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (temp dir)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per write case")
    parser.add_argument("--recover-mib", type=int, default=200)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="bench-segments-", dir=args.dir))
    try:
        print(f"segment store benchmark in {base} ({os.cpu_count()} CPUs)")
        case = 0
        for size in (1 * MIB, 16 * 1024):
            for group in (1, 8):
                case += 1
                bench_append(base / f"w{case}", size, group, args.seconds)
        for size in (1 * MIB, 16 * 1024):
            case += 1
            bench_recover(base / f"r{case}", size, args.recover_mib)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
