"""One container's backlog, read by each shipper in turn: what each costs, dockerd included.

    python bench/bench_pipeline.py [--lines 300000] [--compress gzip] [--flush 200ms]
    python bench/bench_pipeline.py --listener off,on    # the metrics listener's cost
    FLUENT_BIT=/path/to/fluent-bit python bench/bench_pipeline.py

A container writes ``--lines`` lines of ~110 bytes (json-file log driver) and stays up. Then,
one after the other, each of these reads the whole log and the figures are printed:

- ``engine raw read``: the engine's logs API (timestamps on) read by curl into /dev/null, best
  of 2 (http.client when there is no curl; it understates the engine);
- ``forwarder api``: ``forwarder run`` with ``[docker] log_source = "api"`` (the key is left
  out when this forwarder does not know it yet: the API is then its only source);
- ``forwarder file``: ``log_source = "file"``; skipped, with a note, when ``forwarder check``
  rejects the key;
- ``fluent-bit``: when ``$FLUENT_BIT`` names a Fluent Bit binary, its ``tail`` input (``docker``
  parser, Read_from_Head On, positions DB in a temporary directory) on the container's
  json-file, with its ``forward`` output and ``Require_ack_response true``.

The shippers send to the same kind of counting Forward receiver (acks on, no compression
unless ``--compress``); forwarder's ``flush_interval`` and Fluent Bit's ``Flush`` are both
``--flush``. For each: lines/s (from the process start to the last line received, and from
the first chunk to the last), the shipper's CPU µs/line (utime + stime over its whole life,
start-up included), dockerd's (and its containerd's) CPU µs/line over the same window, and the
shipper's peak RSS (VmHWM). Then the ratios: file vs api lines/s, file vs Fluent Bit lines/s,
and (forwarder + engine CPU per line) / (Fluent Bit CPU per line). Figures, not pass/fail.
With ``--listener off,on`` each forwarder run is made with ``[service] http_listen`` off, then
on with a Prometheus-style scrape of /metrics every second, for the listener's CPU cost.
Uses $DOCKER_HOST when it answers (give ``--dockerd-pid`` for engine CPU), else a private
dockerd.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.shippers import (  # noqa: E402
    CpuWindow,
    FluentBit,
    cpu_seconds,
    engine_pids,
    fluent_bit_binary,
    forwarder_sections,
    log_source_known,
    peak_rss_kib,
    start_forwarder,
)
from tests.harness.engine import Engine, _connection  # noqa: E402
from tests.harness.polling import wait_until  # noqa: E402
from tests.harness.receivers import CountingReceiver  # noqa: E402

PAD = "x" * 96  # with the 7-digit number and a space: ~110 bytes a line with its newline


@dataclass
class Result:
    """What one shipper did with the backlog."""

    name: str
    lines: int
    elapsed_s: float  # process start to the last line received
    span_s: float  # first chunk to last chunk received (0 if unknown)
    cpu_s: float  # the shipper's own CPU
    engine_cpu_s: float  # dockerd (+ containerd) over the same window
    engine_detail: str
    peak_rss_kib: int
    note: str = ""

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.elapsed_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.lines * 1e6

    @property
    def engine_us(self) -> float:
        return self.engine_cpu_s / self.lines * 1e6

    def print(self) -> None:
        span = f"; {self.lines / self.span_s:,.0f} first to last chunk" if self.span_s else ""
        print(
            f"{self.name:<16}: {self.lines_per_s:>10,.0f} lines/s ({self.elapsed_s:.2f}s{span})\n"
            f"{'':<16}  CPU {self.cpu_us:5.2f} µs/line ({self.cpu_s:.2f}s{self.note}); "
            f"engine {self.engine_us:5.2f} µs/line ({self.engine_detail}); "
            f"peak RSS {self.peak_rss_kib / 1024:.1f} MiB"
        )


def raw_read_once(engine: Engine, cid: str, pids: dict[str, int]) -> Result:
    """Read the whole logs body (timestamps on, multiplexed) as fast as the engine serves it:
    with curl (a C client) when there is one, else http.client, which decodes the engine's
    one-chunk-per-frame body in Python and so understates the engine."""
    path = f"/containers/{cid}/logs?stdout=1&stderr=1&timestamps=1"
    curl = shutil.which("curl")
    window = CpuWindow(pids).start()
    started = time.perf_counter()
    if curl and engine.host.startswith("unix://"):
        argv = [curl, "-sS", "--unix-socket", engine.host.removeprefix("unix://")]
        argv += ["-o", "/dev/null", f"http://engine{path}"]
        pid = os.posix_spawn(curl, argv, os.environ)
        _, status, usage = os.wait4(pid, 0)
        elapsed = time.perf_counter() - started
        window.stop()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"curl exited with {os.waitstatus_to_exitcode(status)}")
        cpu, rss, name = usage.ru_utime + usage.ru_stime, usage.ru_maxrss, "raw read (curl)"
    else:
        before = cpu_seconds(os.getpid())
        conn = _connection(engine.host, timeout=300)
        conn.request("GET", path)
        response = conn.getresponse()
        while response.read(1 << 20):
            pass
        conn.close()
        elapsed = time.perf_counter() - started
        window.stop()
        cpu, rss, name = cpu_seconds(os.getpid()) - before, 0, "raw read (py)"
    return Result(name, 0, elapsed, 0.0, cpu, window.total, window.describe(), rss)


def scrape_every_second(address: str, stop: threading.Event, sizes: list[int]) -> None:
    """GET /metrics once a second until ``stop``; records the sizes of the answers."""
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
                sizes.append(len(response.read()))
        except OSError:
            sizes.append(-1)


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def run_forwarder(
    engine: Engine,
    args: argparse.Namespace,
    pids: dict[str, int],
    source: str | None,
    mode: str,
    listener: str = "off",
) -> Result:
    address = free_address() if listener == "on" else ""
    stop, sizes = threading.Event(), list[int]()
    scraper = threading.Thread(target=scrape_every_second, args=(address, stop, sizes))
    with tempfile.TemporaryDirectory() as tmp, CountingReceiver() as receiver:
        sections = forwarder_sections(
            engine,
            receiver,
            Path(tmp) / "state",
            log_source=source,
            docker={"read_from": "head"},
            output={
                "compress": args.compress,
                "chunk_limit": args.chunk_limit,
                "flush_interval": args.flush,
            },
            http_listen=address,
        )
        sections["buffer"] = {"mode": mode}
        window = CpuWindow(pids).start()
        started = time.perf_counter()
        collector = start_forwarder(Path(tmp), sections, engine.env)
        startup_cpu = cpu_seconds(collector.pid)
        if address:
            scraper.start()
        receiver.wait_for(args.lines, timeout=600)
        elapsed = time.perf_counter() - started
        window.stop()
        stop.set()
        if address:
            scraper.join()
        cpu, rss = cpu_seconds(collector.pid), peak_rss_kib(collector.pid)
        collector.stop()
    name = f"forwarder {source or 'api'}" + ("" if mode == "spill" else f" [{mode}]")
    if address:
        name += f" [listener, {len(sizes)} scrapes]"
    span = (receiver.last_message_at or 0.0) - (receiver.first_message_at or 0.0)
    net_us = (cpu - startup_cpu) / args.lines * 1e6
    note = f", {startup_cpu:.2f}s of it before 'running:', {net_us:.2f} µs/line after"
    return Result(name, args.lines, elapsed, span, cpu, window.total, window.describe(), rss, note)


def run_fluent_bit(
    engine: Engine, args: argparse.Namespace, pids: dict[str, int], cid: str, binary: Path
) -> Result:
    log_path = str(engine.inspect(cid)["LogPath"])
    with tempfile.TemporaryDirectory() as tmp, CountingReceiver() as receiver:
        fluent_bit = FluentBit(
            binary,
            Path(tmp),
            log_path,
            receiver,
            flush_s=args.flush_s,
            read_from_head=True,
        )
        window = CpuWindow(pids).start()
        started = time.perf_counter()
        fluent_bit.start()
        try:
            receiver.wait_for(args.lines, timeout=600)
        except AssertionError:
            print(fluent_bit.log_tail(), file=sys.stderr)
            raise
        finally:
            elapsed = time.perf_counter() - started
            window.stop()
            cpu, rss = cpu_seconds(fluent_bit.pid), peak_rss_kib(fluent_bit.pid)
            fluent_bit.stop()
    span = (receiver.last_message_at or 0.0) - (receiver.first_message_at or 0.0)
    return Result(
        "fluent-bit", args.lines, elapsed, span, cpu, window.total, window.describe(), rss
    )


def print_ratios(results: dict[str, Result]) -> None:
    api, file, fb = (
        results.get("forwarder api"),
        results.get("forwarder file"),
        results.get("fluent-bit"),
    )
    print("ratios:")
    if file and api:
        print(f"  lines/s, file / api                 : {file.lines_per_s / api.lines_per_s:.2f}")
    if file and fb:
        print(f"  lines/s, file / Fluent Bit          : {file.lines_per_s / fb.lines_per_s:.2f}")
    for shipper in (api, file):
        if shipper and fb:
            ratio = (shipper.cpu_us + shipper.engine_us) / fb.cpu_us
            print(f"  CPU/line, ({shipper.name} + engine) / Fluent Bit: {ratio:.2f}")


def parse_duration_s(text: str) -> float:
    for suffix, scale in (("ms", 1e-3), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * scale
    raise argparse.ArgumentTypeError(f"{text!r}: give a duration like 200ms or 1s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--compress", default="none", choices=["none", "gzip"])
    parser.add_argument("--chunk-limit", default="1MiB")
    parser.add_argument(
        "--flush",
        default="200ms",
        help="forwarder's [output] flush_interval and Fluent Bit's Flush (default 200ms)",
    )
    parser.add_argument(
        "--buffer-modes",
        default="spill",
        help="[buffer] modes of the forwarder runs, comma-separated: spill, always (every chunk "
        "written to the disk buffer before it is sent), memory",
    )
    parser.add_argument("--dockerd-pid", type=int, help="dockerd's pid, for an external engine")
    parser.add_argument(
        "--listener",
        default="off",
        help="[service] http_listen settings of the forwarder runs, comma-separated: off, on "
        "(scraped every second)",
    )
    args = parser.parse_args()
    args.flush_s = parse_duration_s(args.flush)
    binary = fluent_bit_binary()

    engine = Engine.from_environment()
    try:
        pids = engine_pids(engine, args.dockerd_pid)
        if not pids:
            print("engine CPU: not measured (external engine: give --dockerd-pid)")
        api_source = "api" if log_source_known(engine, "api") else None
        file_known = log_source_known(engine, "file")
        last = str(1000000 + args.lines)
        # The container stays up: at a first start, forwarder reads running containers.
        script = f"seq 1000001 {last} | sed 's/$/ {PAD}/'; exec sleep 100000"
        cid = engine.run("sh", "-c", script)
        wait_until(
            lambda: last.encode() in engine.logs_api_bytes(cid, tail=1),
            timeout=300,
            what="the container to write its lines",
        )
        size = Path(str(engine.inspect(cid)["LogPath"])).stat().st_size
        print(
            f"backlog: {args.lines:,} lines, json-file of {size / 1e6:,.1f} MB; "
            f"engine processes {pids or '-'}"
        )

        raw = min(
            raw_read_once(engine, cid, pids),
            raw_read_once(engine, cid, pids),
            key=lambda r: r.elapsed_s,
        )
        raw.lines = args.lines
        raw.name += ", best of 2"
        raw.print()

        results: dict[str, Result] = {}
        for mode in args.buffer_modes.split(","):
            for source in (api_source, "file"):
                if source == "file" and not file_known:
                    print(
                        "forwarder file  : skipped: this forwarder does not know [docker] "
                        'log_source = "file" yet'
                    )
                    continue
                for listener in args.listener.split(","):
                    result = run_forwarder(engine, args, pids, source, mode, listener)
                    result.print()
                    results.setdefault(result.name, result)
        if binary is None:
            print("fluent-bit      : skipped: set FLUENT_BIT to a Fluent Bit binary")
        else:
            result = run_fluent_bit(engine, args, pids, cid, binary)
            result.print()
            results[result.name] = result
        print_ratios(results)
    finally:
        engine.remove_test_containers(everything=engine.is_private)
        engine.close()


if __name__ == "__main__":
    main()
