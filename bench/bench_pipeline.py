"""Raw engine read vs. forwarder shipping, for one container's 300,000 lines of ~110 bytes.

    python bench/bench_pipeline.py [--lines 300000] [--compress gzip] [--listener off,on]

Prints lines/s for (1) the engine's logs API read of the whole log, by a minimal client
that only reads the body, and (2) `forwarder run` shipping the same log to a counting
Forward receiver (acks on), with their ratio and the collector's peak RSS and CPU. With
``--listener off,on`` each buffer mode runs with ``[service] http_listen`` off, then on with
a Prometheus-style scrape of /metrics every second, for the listener's CPU cost. Figures, not
pass/fail. Uses $DOCKER_HOST when it answers, else starts a private dockerd.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.collector import CollectorProcess, collector_env, write_config  # noqa: E402
from tests.harness.engine import Engine, _connection  # noqa: E402
from tests.harness.polling import wait_until  # noqa: E402
from tests.harness.receivers import CountingReceiver  # noqa: E402

PAD = "x" * 96  # with the 7-digit number and a space: ~110 bytes a line with its newline


def raw_read(engine: Engine, cid: str) -> tuple[int, float]:
    """Read the whole logs body (timestamps on, multiplexed) as fast as the engine serves it:
    with curl (a C client) when there is one, else http.client, which decodes the engine's
    one-chunk-per-frame body in Python and so understates the engine."""
    path = f"/containers/{cid}/logs?stdout=1&stderr=1&timestamps=1"
    curl = shutil.which("curl")
    started = time.perf_counter()
    if curl and engine.host.startswith("unix://"):
        out = subprocess.run(
            [
                curl,
                "-sS",
                "--unix-socket",
                engine.host.removeprefix("unix://"),
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                f"http://engine{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout), time.perf_counter() - started
    conn = _connection(engine.host, timeout=300)
    conn.request("GET", path)
    response = conn.getresponse()
    total = 0
    while data := response.read(1 << 20):
        total += len(data)
    conn.close()
    return total, time.perf_counter() - started


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_every_second(address: str, stop: threading.Event) -> list[int]:
    """GET /metrics once a second until ``stop``; the sizes of the answers."""
    sizes: list[int] = []
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
                sizes.append(len(response.read()))
        except OSError:
            sizes.append(-1)
    return sizes


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def ship(
    engine: Engine, args: argparse.Namespace, mode: str, raw_s: float, listener: str = "off"
) -> None:
    """Run `forwarder run` on the container's log to a counting receiver; print figures."""
    address = free_address() if listener == "on" else ""
    stop = threading.Event()
    sizes: list[int] = []
    scraper = threading.Thread(
        target=lambda: sizes.extend(scrape_every_second(address, stop)), daemon=True
    )
    with tempfile.TemporaryDirectory() as tmp, CountingReceiver() as receiver:
        config = write_config(
            Path(tmp) / "bench.toml",
            {
                "docker": {"host": engine.host, "read_from": "head"},
                "output": {
                    "servers": [receiver.address],
                    "compress": args.compress,
                    "chunk_limit": args.chunk_limit,
                },
                "state": {"dir": str(Path(tmp) / "state")},
                "stats": {"interval": "0s"},
                "buffer": {"mode": mode},
                "service": {"http_listen": address},
            },
        )
        collector = CollectorProcess(config, collector_env(engine.env), Path(tmp))
        started = time.perf_counter()
        collector.start()
        if address:
            scraper.start()
        receiver.wait_for(args.lines, timeout=600)
        elapsed = time.perf_counter() - started
        stop.set()
        if address:
            scraper.join()
        first = receiver.first_message_at or 0.0
        last = receiver.last_message_at or 0.0
        rss = peak_rss_kib(collector.pid)
        cpu = cpu_seconds(collector.pid)
        collector.stop()
    scrapes = f", {len(sizes)} scrapes of ~{max(sizes, default=0)} bytes" if address else ""
    print(
        f"forwarder [{mode:>6}, listener {listener}{scrapes}]: "
        f"{args.lines / elapsed:>10,.0f} lines/s "
        f"({elapsed:.2f}s from process start; {last - first:.2f}s first to last chunk; "
        f"{receiver.messages} chunks, {receiver.bytes_received / 1e6:,.1f} MB sent)"
    )
    print(f"  ratio           : {raw_s / elapsed:.2f} of the raw read's speed")
    print(
        f"  collector       : peak RSS {rss / 1024:.1f} MiB, CPU {cpu:.2f}s "
        f"({args.lines / cpu:,.0f} lines per CPU-second)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--compress", default="none", choices=["none", "gzip"])
    parser.add_argument("--chunk-limit", default="1MiB")
    parser.add_argument(
        "--buffer-modes",
        default="spill",
        help="[buffer] modes to run, comma-separated: spill, always (every chunk written to "
        "the disk buffer before it is sent), memory",
    )
    parser.add_argument(
        "--listener",
        default="off",
        help="[service] http_listen settings to run, comma-separated: off, on (scraped "
        "every second)",
    )
    args = parser.parse_args()

    engine = Engine.from_environment()
    try:
        last = str(1000000 + args.lines)
        # The container stays up: at a first start, forwarder reads running containers.
        script = f"seq 1000001 {last} | sed 's/$/ {PAD}/'; exec sleep 100000"
        cid = engine.run("sh", "-c", script)
        wait_until(
            lambda: last.encode() in engine.logs_api_bytes(cid, tail=1),
            timeout=300,
            what="the container to write its lines",
        )

        raw_bytes, raw_s = raw_read(engine, cid)
        raw_bytes, raw_s = min(raw_read(engine, cid), raw_read(engine, cid), key=lambda r: r[1])
        print(
            f"engine raw read : {args.lines / raw_s:>10,.0f} lines/s "
            f"({raw_bytes / raw_s / 1e6:,.1f} MB/s, {raw_s:.2f}s, best of 2)"
        )

        for mode in args.buffer_modes.split(","):
            for listener in args.listener.split(","):
                ship(engine, args, mode, raw_s, listener)
    finally:
        engine.remove_test_containers(everything=engine.is_private)
        engine.close()


if __name__ == "__main__":
    main()
