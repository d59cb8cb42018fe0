"""The steady state: many containers trickling lines, every shipper on them in the same window.

    python bench/bench_steady.py [--containers 50] [--rate 10000] [--seconds 60]
    FLUENT_BIT=/path/to/fluent-bit python bench/bench_steady.py --seconds 20
    python bench/bench_steady.py --idle 500 [--stats-interval 10s] [--seconds 60]

Trickle (default): ``--containers`` busybox containers print ``--rate`` lines/s in all (~110
bytes a line, in bursts every ~100 ms). First, for ``--baseline`` seconds with no shipper, the
engine's CPU (dockerd and its containerd: writing the json-files) and the lines actually
written (counted in the json-files) are measured. Then these start together, each shipping
to its own counting Forward receiver (acks on, no compression):

- forwarder with ``[docker] log_source = "api"`` (the key left out when not known yet);
- forwarder with ``log_source = "file"``, when ``forwarder check`` accepts the key;
- Fluent Bit, when ``$FLUENT_BIT`` names its binary: one ``tail`` input (``docker`` parser,
  positions DB in a temporary directory) with a glob over the containers' json-files,
  ``forward`` output with ``Require_ack_response true``;

and after ``--warmup`` seconds a window of ``--seconds`` seconds is measured. Printed per
shipper: lines/s received, CPU % of a core and µs/line, RSS now and peak, and the latency of
each line from its engine timestamp (the record time the receiver gets) to its arrival at the
receiver: p50, p99, max. Then the engine's CPU % in the window, in the baseline, and the
difference, which is what serving the API costs it (only the API shipper asks it for logs),
and the ratios (shipper + its engine share) / Fluent Bit. forwarder's ``flush_interval`` and
Fluent Bit's ``Flush`` are both ``--flush`` (default 1s).

Idle (``--idle N``): N containers that only sleep (their creation is timed: it is slow on the
vfs storage driver), and forwarder with ``[stats] interval = --stats-interval`` for each log
source in turn: once N records have arrived (a first round of stats) and ``--warmup`` seconds
more, its CPU % of a core, RSS now and peak, and the engine's CPU % over ``--seconds``.

Figures, not pass/fail. Uses $DOCKER_HOST when it answers (give ``--dockerd-pid`` for the
engine's CPU), else a private dockerd.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.shippers import (  # noqa: E402
    CpuWindow,
    FluentBit,
    LatencyReceiver,
    cpu_seconds,
    engine_pids,
    fluent_bit_binary,
    forwarder_sections,
    log_source_known,
    peak_rss_kib,
    percentile,
    rss_kib,
    start_forwarder,
)
from tests.harness.engine import Engine  # noqa: E402

LINE_PAD = "x" * 97  # "c007 0000001 " + pad + newline: ~110 bytes
BURST_S = 0.1
CREATE_WORKERS = 4


def trickle_script(index: int, lines_per_s: float) -> str:
    """A busybox sh loop printing about ``lines_per_s`` numbered lines a second in bursts."""
    burst = max(1, round(lines_per_s * BURST_S))
    pause_us = round(burst / lines_per_s * 1e6)
    numbers = " ".join(f"$((i+{k}))" for k in range(burst))
    return (
        f"i=0; while true; do printf 'c{index:03d} %07d {LINE_PAD}\\n' {numbers}; "
        f"i=$((i+{burst})); usleep {pause_us}; done"
    )


def start_containers(engine: Engine, scripts: list[str]) -> float:
    """Start one container per script, a few at a time; returns the seconds it took."""
    started = time.perf_counter()
    with ThreadPoolExecutor(CREATE_WORKERS) as pool:
        list(pool.map(lambda script: engine.run("sh", "-c", script), scripts))
    return time.perf_counter() - started


def written_lines(paths: list[Path], offsets: dict[Path, int]) -> int:
    """Lines appended to the json-files since ``offsets`` (which are moved to the end)."""
    total = 0
    for path in paths:
        with path.open("rb") as f:
            f.seek(offsets.get(path, 0))
            data = f.read()
        offsets[path] = offsets.get(path, 0) + len(data)
        total += data.count(b"\n")
    return total


@dataclass
class Shipper:
    name: str
    pid: int
    receiver: LatencyReceiver


def pct(cpu_s: float, wall_s: float) -> str:
    return f"{cpu_s / wall_s * 100:5.1f} %"


@contextlib.contextmanager
def shippers_started(
    engine: Engine, args: argparse.Namespace, sources: list[str | None], glob: str, tmp: Path
) -> Iterator[list[Shipper]]:
    started: list[Shipper] = []
    with contextlib.ExitStack() as stack:
        for source in sources:
            receiver = stack.enter_context(LatencyReceiver())
            sections = forwarder_sections(
                engine,
                receiver,
                tmp / f"state-{source}",
                log_source=source,
                output={"flush_interval": args.flush},
            )
            collector = start_forwarder(tmp / f"forwarder-{source}", sections, engine.env)
            stack.callback(collector.stop)
            started.append(Shipper(f"forwarder {source or 'api'}", collector.pid, receiver))
        binary = fluent_bit_binary()
        if binary is not None:
            receiver = stack.enter_context(LatencyReceiver())
            fluent_bit = FluentBit(
                binary,
                tmp / "fluent-bit",
                glob,
                receiver,
                flush_s=args.flush_s,
                read_from_head=False,
            ).start()
            stack.callback(fluent_bit.stop)
            started.append(Shipper("fluent-bit", fluent_bit.pid, receiver))
        yield started


def run_trickle(engine: Engine, args: argparse.Namespace, pids: dict[str, int]) -> None:
    per_container = args.rate / args.containers
    scripts = [trickle_script(i, per_container) for i in range(args.containers)]
    took = start_containers(engine, scripts)
    print(
        f"{args.containers} containers trickling {args.rate:,} lines/s in all "
        f"(started in {took:.1f}s)"
    )
    paths = [Path(str(engine.inspect(cid)["LogPath"])) for cid in sorted(engine.created)]
    glob = str(paths[0].parent.parent / "*" / "*-json.log")
    offsets: dict[Path, int] = {}
    written_lines(paths, offsets)

    baseline = CpuWindow(pids).start()
    time.sleep(args.baseline)  # a measuring window, not synchronisation
    baseline.stop()
    produced = written_lines(paths, offsets) / baseline.elapsed
    print(
        f"baseline, no shipper, {baseline.elapsed:.0f}s: {produced:,.0f} lines/s written; "
        f"engine {pct(baseline.total, baseline.elapsed)} of a core ({baseline.describe()})"
    )

    sources: list[str | None] = [args.api_source]
    if args.file_known:
        sources.append("file")
    else:
        print(
            'forwarder file: skipped: this forwarder does not know [docker] log_source = "file" yet'
        )
    if fluent_bit_binary() is None:
        print("fluent-bit: skipped: set FLUENT_BIT to a Fluent Bit binary")
    with (
        tempfile.TemporaryDirectory() as tmp,
        shippers_started(engine, args, sources, glob, Path(tmp)) as shippers,
    ):
        for shipper in shippers:
            shipper.receiver.wait_for(1, timeout=120)
        time.sleep(args.warmup)  # let every shipper reach its steady state before measuring
        window = CpuWindow({**pids, **{s.name: s.pid for s in shippers}})
        bench_cpu = cpu_seconds(os.getpid())
        counts = {s.name: s.receiver.entries for s in shippers}
        for shipper in shippers:
            shipper.receiver.measuring.set()
        written_lines(paths, offsets)
        window.start()
        time.sleep(args.seconds)  # the measuring window
        window.stop()
        for shipper in shippers:
            shipper.receiver.measuring.clear()
        bench_cpu = cpu_seconds(os.getpid()) - bench_cpu
        written = written_lines(paths, offsets) / window.elapsed
        report_trickle(shippers, window, counts, baseline, pids, written, args)
        print(f"this script (receivers, latency decoding): {pct(bench_cpu, window.elapsed)}")


def report_trickle(
    shippers: list[Shipper],
    window: CpuWindow,
    counts: dict[str, int],
    baseline: CpuWindow,
    pids: dict[str, int],
    written: float,
    args: argparse.Namespace,
) -> None:
    wall = window.elapsed
    print(f"window {wall:.1f}s: {written:,.0f} lines/s written (json-files)")
    cpu_us: dict[str, float] = {}
    for s in shippers:
        lines = s.receiver.entries - counts[s.name]
        cpu = window.used[s.name]
        cpu_us[s.name] = cpu / max(lines, 1) * 1e6
        lat = s.receiver.latencies
        print(
            f"{s.name:<15}: {lines / wall:>8,.0f} lines/s, CPU {pct(cpu, wall)} of a core "
            f"({cpu_us[s.name]:.1f} µs/line), RSS {rss_kib(s.pid) / 1024:.1f} MiB "
            f"(peak {peak_rss_kib(s.pid) / 1024:.1f}); latency p50 {percentile(lat, 0.5) * 1e3:.0f}"
            f" ms, p99 {percentile(lat, 0.99) * 1e3:.0f} ms, max {max(lat, default=0) * 1e3:.0f}"
            f" ms ({len(lat):,} lines)"
        )
    engine = sum(window.used[name] for name in pids)
    engine_base = baseline.total / baseline.elapsed * wall
    extra = engine - engine_base
    print(
        f"engine         : {pct(engine, wall)} of a core in the window, "
        f"{pct(baseline.total, baseline.elapsed)} in the baseline: {pct(extra, wall)} "
        "serving the shippers"
    )
    print(f"target p99: flush_interval + 50 ms = {args.flush_s * 1e3 + 50:.0f} ms")
    fb = next((s for s in shippers if s.name == "fluent-bit"), None)
    if fb is None:
        return
    fb_cpu = window.used[fb.name]
    names = [s.name for s in shippers]
    api_runs = "forwarder api" in names
    for s in shippers:
        if s is fb:
            continue
        # Only an API source asks dockerd for logs: the engine's extra is that shipper's.
        share = extra if s.name == "forwarder api" or not api_runs else 0.0
        lines = max(s.receiver.entries - counts[s.name], 1)
        per_line = (cpu_us[s.name] + share / lines * 1e6) / cpu_us[fb.name]
        print(
            f"ratio CPU, ({s.name} + engine {share / wall * 100:.1f} %) / Fluent Bit: "
            f"{(window.used[s.name] + share) / fb_cpu:.2f} (per line: {per_line:.2f})"
        )


def run_idle(engine: Engine, args: argparse.Namespace, pids: dict[str, int]) -> None:
    took = start_containers(engine, ["exec sleep 1000000"] * args.idle)
    print(f"{args.idle} idle containers started in {took:.1f}s ({took / args.idle:.2f}s each)")
    baseline = CpuWindow(pids).start()
    time.sleep(args.baseline)  # a measuring window
    baseline.stop()
    print(f"engine, no shipper: {pct(baseline.total, baseline.elapsed)} of a core")
    sources: list[str | None] = [args.api_source]
    if args.file_known:
        sources.append("file")
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp, LatencyReceiver() as receiver:
            sections = forwarder_sections(
                engine,
                receiver,
                Path(tmp) / "state",
                log_source=source,
                stats_interval=args.stats_interval,
            )
            started = time.perf_counter()
            collector = start_forwarder(Path(tmp), sections, engine.env)
            try:
                receiver.wait_for(args.idle, timeout=600)
                ready = time.perf_counter() - started
                time.sleep(args.warmup)  # past the start-up burst before measuring
                window = CpuWindow({**pids, "forwarder": collector.pid}).start()
                time.sleep(args.seconds)  # the measuring window
                window.stop()
                wall = window.elapsed
                engine_cpu = window.total - window.used["forwarder"]
                print(
                    f"forwarder {source or 'api'}: first {args.idle} records in {ready:.1f}s; over "
                    f"{wall:.0f}s CPU {pct(window.used['forwarder'], wall)} of a core, RSS "
                    f"{rss_kib(collector.pid) / 1024:.1f} MiB (peak "
                    f"{peak_rss_kib(collector.pid) / 1024:.1f}); engine {pct(engine_cpu, wall)}"
                )
            finally:
                collector.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--rate", type=int, default=10_000, help="lines/s in all")
    parser.add_argument("--seconds", type=float, default=60.0, help="the measuring window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--baseline", type=float, default=10.0, help="engine alone, seconds")
    parser.add_argument("--flush", default="1s", help="flush_interval and Fluent Bit's Flush")
    parser.add_argument("--idle", type=int, help="idle mode with this many containers")
    parser.add_argument("--stats-interval", default="10s")
    parser.add_argument("--dockerd-pid", type=int, help="dockerd's pid, for an external engine")
    args = parser.parse_args()
    text = args.flush
    args.flush_s = float(text[:-2]) / 1e3 if text.endswith("ms") else float(text.rstrip("s"))
    fluent_bit_binary()  # a wrong $FLUENT_BIT stops here, before the containers start

    engine = Engine.from_environment()
    try:
        pids = engine_pids(engine, args.dockerd_pid)
        if not pids:
            print("engine CPU: not measured (external engine: give --dockerd-pid)")
        args.api_source = "api" if log_source_known(engine, "api") else None
        args.file_known = log_source_known(engine, "file")
        if args.idle:
            run_idle(engine, args, pids)
        else:
            run_trickle(engine, args, pids)
    finally:
        engine.remove_test_containers(everything=engine.is_private)
        engine.close()


if __name__ == "__main__":
    main()
