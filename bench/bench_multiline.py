"""The cost of multiline joining on the hot path, in process (no engine, no network).

    python bench/bench_multiline.py [--lines 300000]

For each preset, prints lines/s of (a) a backlog of real-looking stack traces (the recorded
traces in tests/data/multiline/ between ordinary lines) through the joiner and the log entry
encoder, and (b) ordinary single lines of ~110 bytes through the same, against the encoder
alone: the overhead a preset adds when nothing is to be joined. In batches of 1,000 lines,
as the engine's reads give them. Figures, not pass/fail; this measures the in-process part
only, so bench_pipeline.py's end-to-end overhead is smaller.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forwarder.forward.protocol import encode_log_entries, log_head  # noqa: E402
from forwarder.multiline import PRESETS, Joiner, Limits  # noqa: E402
from forwarder.records import LogLine, Position  # noqa: E402

CID = "ab" * 32
BATCH = 1000


def batches(lines: list[LogLine]) -> list[list[LogLine]]:
    return [lines[i : i + BATCH] for i in range(0, len(lines), BATCH)]


def run(parts: list[list[LogLine]], joiner: Joiner | None) -> float:
    head = log_head(CID, "/bench")
    started = time.perf_counter()
    for part in parts:
        position = Position(part[-1].ts_ns, 1)
        records = joiner.feed(part, position)[0] if joiner is not None else part
        encode_log_entries(CID, "/bench", records, head=head)
    return time.perf_counter() - started


def best(fn: Callable[[], float], repeat: int = 3) -> float:
    return min(fn() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=300_000)
    args = parser.parse_args()
    n = args.lines
    pad = "x" * 96
    plain = [LogLine("stdout", 10**18 + i, f"{i:07d} {pad}") for i in range(n)]
    plain_parts = batches(plain)
    base = best(lambda: run(plain_parts, None))
    print(f"ordinary lines, no multiline: {n / base:,.0f} lines/s")
    for preset in sorted(PRESETS):
        trace = (ROOT / "tests" / "data" / "multiline" / f"{preset}.log").read_text().splitlines()
        backlog: list[LogLine] = []
        while len(backlog) < n:
            backlog += [
                LogLine("stderr", 10**18 + len(backlog) + i, t) for i, t in enumerate(trace)
            ]
        trace_parts = batches(backlog[:n])

        def joined(parts: list[list[LogLine]], name: str = preset) -> float:
            return run(parts, Joiner(PRESETS[name], Limits(), None, time.monotonic))

        traces_s = best(lambda parts=trace_parts: joined(parts))  # type: ignore[misc]
        plain_s = best(lambda: joined(plain_parts))
        print(
            f"{preset:>6}: stack-trace backlog {n / traces_s:,.0f} lines/s; ordinary lines "
            f"{n / plain_s:,.0f} lines/s ({(plain_s / base - 1) * 100:+.0f}% vs none, "
            f"+{(plain_s - base) / n * 1e6:.2f} us a line)"
        )


if __name__ == "__main__":
    main()
