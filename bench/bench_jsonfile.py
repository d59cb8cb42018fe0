"""Micro-benchmark of the json-file hot path, beside the API stream's (bench_frames.py).

Prints, for ~300,000 json-file lines of ~110 bytes of text (stdout and stderr, a new second
every 1,000 lines) fed in 1 MiB blocks:

- the JSON decoders on this exact shape: the standard library, orjson (if installed) and
  msgspec, one call per line and one per block, without and with the timestamp parse;
- JsonFileParser.feed, and JsonFileParser + PartialJoiner (parse + join);
- the API source's Demuxer + PartialJoiner on the same lines (bench_frames.py's figure);

as lines/s and CPU µs/line (process CPU time, best of 5). Run:
``python bench/bench_jsonfile.py [lines] [--file <id>-json.log]``; with ``--file`` the json-file
lines are those of a real file (written by the engine), else they are built in its format.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from bench.bench_frames import LINE, _timestamp, build, chunks
from forwarder.docker.frames import Demuxer, PartialJoiner
from forwarder.docker.jsonfile import JsonFileParser
from forwarder.records import RawLine
from forwarder.timefmt import parse_time_ns

BLOCK_BYTES = 1 << 20
_new = tuple.__new__


def build_jsonfile(count: int) -> bytes:
    """``count`` lines as json-file writes them (Go's RFC3339Nano trims trailing zeros)."""
    parts = []
    for i in range(count):
        ts = _timestamp(i).decode()
        frac = ts[20:29].rstrip("0")
        ts = ts[:19] + ("." + frac if frac else "") + "Z"
        entry = {
            "log": (LINE % (i % 100000)).decode() + "\n",
            "stream": "stdout" if i % 5 else "stderr",
            "time": ts,
        }
        parts.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
    return b"".join(parts)


def blocks_of(data: bytes) -> list[bytes]:
    """1 MiB blocks, each cut at a line end (what a reader hands the decoders)."""
    out, p = [], 0
    while p < len(data):
        end = data.rfind(b"\n", p, p + BLOCK_BYTES) + 1 or len(data)
        out.append(data[p:end])
        p = end
    return out


def best_of(runs: int, fn: Callable[[], int]) -> tuple[float, float, int]:
    """(best wall seconds, best CPU seconds, items produced)."""
    wall = cpu = float("inf")
    produced = 0
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        produced = fn()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu, produced


class _Entry(msgspec.Struct, gc=False):
    log: str
    stream: str
    time: str


def decoders(blocks: list[bytes]) -> list[tuple[str, Callable[[], int]]]:
    ms_decoder = msgspec.json.Decoder(_Entry)

    def array(block: bytes) -> bytes:
        return b"[" + b",".join(block.splitlines()) + b"]"

    def with_ts(entries: list[dict[str, str]]) -> int:
        out = [
            _new(RawLine, (e["stream"], _ts(e["time"]), e["log"][:-1].encode(), False))
            for e in entries
        ]
        return len(out)

    runs: list[tuple[str, Callable[[], int]]] = [
        (
            "stdlib json, per line",
            lambda: sum(len([json.loads(x) for x in b.splitlines()]) for b in blocks),
        ),
        ("stdlib json, per block", lambda: sum(len(json.loads(array(b))) for b in blocks)),
        ("stdlib json, block + ts", lambda: sum(with_ts(json.loads(array(b))) for b in blocks)),
    ]
    try:
        import orjson
    except ImportError:
        print("(orjson not installed: skipped)")
    else:
        runs += [
            (
                "orjson, per line",
                lambda: sum(len([orjson.loads(x) for x in b.splitlines()]) for b in blocks),
            ),
            ("orjson, per block", lambda: sum(len(orjson.loads(array(b))) for b in blocks)),
            ("orjson, block + ts", lambda: sum(with_ts(orjson.loads(array(b))) for b in blocks)),
        ]
    runs += [
        (
            "msgspec, per line",
            lambda: sum(len([ms_decoder.decode(x) for x in b.splitlines()]) for b in blocks),
        ),
        ("msgspec, decode_lines", lambda: sum(len(ms_decoder.decode_lines(b)) for b in blocks)),
        (
            "msgspec, decode_lines + ts",
            lambda: sum(
                len(
                    [
                        _new(RawLine, (e.stream, _ts(e.time), e.log[:-1].encode(), False))
                        for e in ms_decoder.decode_lines(b)
                    ]
                )
                for b in blocks
            ),
        ),
    ]
    return runs


_SECONDS: dict[str, int] = {}


def _ts(t: str) -> int:
    """The same per-second cache JsonFileParser uses, for the decoder comparison."""
    base = _SECONDS.get(t[:19])
    if base is None:
        base = _SECONDS[t[:19]] = parse_time_ns(t[:19] + "Z")
    frac = t[20:-1] if t[19] == "." else ""
    return base + int(frac) * 10 ** (9 - len(frac)) if frac else base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lines", nargs="?", type=int, default=300_000)
    parser.add_argument("--file", type=Path, help="a json-file log written by the engine")
    args = parser.parse_args()
    if args.file is not None:
        data = args.file.read_bytes()
        count = data.count(b"\n")
        print(f"{args.file}: {count} lines, {len(data) / count:.0f} bytes per line")
    else:
        count = args.lines
        data = build_jsonfile(count)
        print(f"{count} json-file lines built, {len(data) / count:.0f} bytes per line")
    blocks = blocks_of(data)
    framed_chunks = chunks(build(count, tty=False))

    def parse() -> int:
        p = JsonFileParser()
        return sum(len(p.feed(b).lines) for b in blocks)

    def parse_join() -> int:
        p = JsonFileParser()
        joiner = PartialJoiner(1 << 20)
        return sum(len(joiner.feed(p.feed(b).lines)) for b in blocks) + len(joiner.flush())

    def api_path() -> int:
        demuxer = Demuxer()
        joiner = PartialJoiner(1 << 20)
        return sum(len(joiner.feed(demuxer.feed(c))) for c in framed_chunks)

    runs = [
        *decoders(blocks),
        ("JsonFileParser.feed", parse),
        ("json-file: parse + join", parse_join),
        ("API stream: Demuxer + join", api_path),
    ]
    for name, fn in runs:
        wall, cpu, produced = best_of(5, fn)
        assert produced == count, (name, produced)
        print(f"{name:28} {count / wall:12,.0f} lines/s  {cpu / count * 1e6:6.2f} CPU µs/line")


if __name__ == "__main__":
    main()
