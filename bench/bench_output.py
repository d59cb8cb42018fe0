"""The Forward output alone, over links with a round-trip time: chunks in flight per server.

    python bench/bench_output.py [--chunks 150] [--rtt-ms 0 2 10 50] [--windows 1 4]

Sends ``--chunks`` chunks of ~1 MiB of real log entries through ForwardOutput to a counting
Forward receiver process (acks on), through a proxy process that delays each direction by
half the round-trip time, and prints MB/s and lines/s for each window (chunks that may
await their acks at once on one connection). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forwarder import tuning  # noqa: E402
from forwarder.chunks import Chunk, Chunker  # noqa: E402
from forwarder.config import config_from_dict  # noqa: E402
from forwarder.forward.output import ForwardOutput  # noqa: E402
from forwarder.forward.protocol import encode_log_entries  # noqa: E402
from forwarder.records import LogLine  # noqa: E402


def make_chunks(count: int) -> list[Chunk]:
    chunker = Chunker(chunk_limit=1 << 20, flush_interval_s=1, require_ack=True, compress=False)
    base_ns = 1_700_000_000_000_000_000
    lines = [LogLine("stdout", base_ns + i, f"{1000000 + i} " + "x" * 96) for i in range(1000)]
    entries = encode_log_entries("a" * 64, "/bench", lines)
    chunks: list[Chunk] = []
    while len(chunks) < count:
        chunks += chunker.add("docker.bench", entries, len(lines), 0.0)
    return chunks[:count]


async def ship(port: int, chunks: list[Chunk]) -> float:
    cfg = config_from_dict({"output": {"servers": [f"tcp://127.0.0.1:{port}"]}}).output
    queue = list(chunks)
    done = asyncio.Event()
    delivered = 0

    async def get() -> Chunk:
        if not queue:
            await asyncio.Event().wait()  # no more: wait to be cancelled
        return queue.pop(0)

    async def on_delivered(_chunk: Chunk) -> None:
        nonlocal delivered
        delivered += 1
        if delivered == len(chunks):
            done.set()

    async def on_stalled(_chunk: Chunk) -> None:
        raise SystemExit("the receiver went away")

    output = ForwardOutput(cfg, get_chunk=get, delivered=on_delivered, stalled=on_stalled)
    started = time.perf_counter()
    task = asyncio.create_task(output.run())
    await done.wait()
    elapsed = time.perf_counter() - started
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return elapsed


async def proxy(target_port: int, delay_s: float) -> None:
    """Forward 127.0.0.1:<printed port> to target_port, each direction ``delay_s`` late."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(1 << 20):
                loop.call_later(delay_s, writer.write, data)
        finally:
            loop.call_later(delay_s + 0.001, writer.close)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=150)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 2, 10, 50])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, tuning.CHUNKS_IN_FLIGHT])
    parser.add_argument("--proxy", type=float, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        asyncio.run(proxy(int(args.proxy[0]), args.proxy[1]))
        return

    chunks = make_chunks(args.chunks)
    megabytes = sum(c.size for c in chunks) / 1e6
    lines = sum(c.count for c in chunks)
    receiver = subprocess.Popen(
        [sys.executable, "-m", "tests.harness.receivers", "--port", "0"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    assert receiver.stdin is not None
    try:
        port = json.loads(receiver.stdout.readline())["listening"]
        print(f"{len(chunks)} chunks, {megabytes:.0f} MB, {lines:,} lines, acks on")
        for rtt_ms in args.rtt_ms:
            link = None
            target = port
            if rtt_ms > 0:
                link = subprocess.Popen(
                    [sys.executable, __file__, "--proxy", str(port), str(rtt_ms / 2000)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert link.stdout is not None
                target = int(link.stdout.readline())
            try:
                for window in args.windows:
                    tuning.CHUNKS_IN_FLIGHT = window
                    elapsed = asyncio.run(ship(target, chunks))
                    print(
                        f"rtt {rtt_ms:4g} ms, {window} in flight: {megabytes / elapsed:7.0f} MB/s "
                        f"{lines / elapsed:>12,.0f} lines/s ({elapsed:.2f}s)"
                    )
            finally:
                if link is not None:
                    link.kill()
                    link.wait()
    finally:
        receiver.stdin.close()
        receiver.wait()


if __name__ == "__main__":
    main()
