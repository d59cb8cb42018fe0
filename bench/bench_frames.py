"""Micro-benchmark of the logs hot path: Demuxer.feed, TtyReader.feed, PartialJoiner.feed.

Builds ~300,000 non-TTY frames of ~110-byte lines (stdout and stderr, a new second every
1,000 lines), feeds them in 64 KiB chunks and prints lines/s. Run:
``python bench/bench_frames.py [lines]``.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable

from forwarder.docker.frames import Demuxer, PartialJoiner, TtyReader
from forwarder.records import RawLine

CHUNK_BYTES = 64 * 1024
LINE = (
    b'{"level":"info","msg":"request served","method":"GET","path":"/api/v1/items",'
    b'"status":200,"ms":%05d,"cache":1}'
)


def _timestamp(i: int) -> bytes:
    second, ns = divmod(i, 1000)
    return b"2026-11-25T07:%02d:%02d.%09dZ" % (second // 60 % 60, second % 60, ns * 997)


def build(count: int, tty: bool) -> bytes:
    """``count`` messages as the engine sends them, with or without frame headers."""
    parts: list[bytes] = []
    for i in range(count):
        text = LINE % (i % 100000)
        if tty:
            parts.append(_timestamp(i) + b" " + text + b"\r\n")
        else:
            payload = _timestamp(i) + b" " + text + b"\n"
            parts.append(struct.pack(">BxxxL", 1 if i % 5 else 2, len(payload)) + payload)
    return b"".join(parts)


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]


def best_of(runs: int, fn: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    produced = 0
    for _ in range(runs):
        start = time.perf_counter()
        produced = fn()
        best = min(best, time.perf_counter() - start)
    return best, produced


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    framed = build(count, tty=False)
    raw_tty = build(count, tty=True)
    framed_chunks = chunks(framed)
    tty_chunks = chunks(raw_tty)
    print(
        f"{count} lines of {len(LINE % 0)} bytes, {len(framed) / count:.0f} bytes per frame "
        f"(header, timestamp, newline), 64 KiB chunks"
    )

    def demux() -> int:
        demuxer = Demuxer()
        return sum(len(demuxer.feed(chunk)) for chunk in framed_chunks)

    def tty() -> int:
        reader = TtyReader()
        return sum(len(reader.feed(chunk)) for chunk in tty_chunks) + len(reader.flush())

    demuxer = Demuxer()
    batches: list[list[RawLine]] = [demuxer.feed(chunk) for chunk in framed_chunks]

    def join() -> int:
        joiner = PartialJoiner(1 << 20)
        return sum(len(joiner.feed(batch)) for batch in batches)

    def both() -> int:
        demuxer = Demuxer()
        joiner = PartialJoiner(1 << 20)
        return sum(len(joiner.feed(demuxer.feed(chunk))) for chunk in framed_chunks)

    for name, fn in [
        ("Demuxer.feed", demux),
        ("TtyReader.feed", tty),
        ("PartialJoiner.feed", join),
        ("Demuxer + PartialJoiner", both),
    ]:
        seconds, produced = best_of(5, fn)
        assert produced == count, (name, produced)
        print(f"{name:26} {count / seconds:12,.0f} lines/s  ({seconds * 1000:7.1f} ms)")


if __name__ == "__main__":
    main()
