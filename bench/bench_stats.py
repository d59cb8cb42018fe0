"""What do stats records cost? The collector's CPU, and the engine's, with idle containers.

For each ``[stats] interval`` (by default "0s", i.e. off, as the baseline, then "1s" and
"10s"), the script runs ``forwarder run`` as a process against ``--containers`` idle
containers (``sleep``), waits until it follows all of them and has shipped a first round of
stats records, then measures over ``--window`` seconds of wall time the CPU (utime + stime
from ``/proc/<pid>/stat``) used by:

- the collector process;
- dockerd, and its containerd;
- the containers' runc shims (containerd asks them for the cgroup figures).

100 % is one core. The records go to a counting Forward receiver (tests/harness), which
runs in this process; its CPU is not counted. The engine is a private dockerd (like the
tests'), unless ``--docker-host`` names one whose dockerd pid you give with ``--dockerd-pid``.

Each interval runs once per ``--sources`` (``[stats] source``: "api" asks the Stats API,
"cgroup" reads the host's cgroup files), side by side.

    python bench/bench_stats.py                      # 50 containers, 30 s windows
    python bench/bench_stats.py --intervals 1s 2s 10s --window 60
    python bench/bench_stats.py --intervals 10s --sources api cgroup --containers 100
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from forwarder.config import parse_duration  # noqa: E402
from tests.harness.collector import CollectorProcess, collector_env, write_config  # noqa: E402
from tests.harness.engine import Engine  # noqa: E402
from tests.harness.polling import wait_until  # noqa: E402
from tests.harness.receivers import CountingReceiver  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (fields 14 and 15 of proc(5))."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def cmdlines() -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            found[int(entry.name)] = raw.decode(errors="replace").split("\0")
    return found


@dataclass
class EnginePids:
    dockerd: int
    containerd: list[int]
    shims: list[int]

    @classmethod
    def find(cls, dockerd: int, marker: str | None) -> EnginePids:
        """containerd and the shims: by our private directory in their command line, or
        (external engine) every containerd and shim on the machine."""
        containerd, shims = [], []
        for pid, argv in cmdlines().items():
            if marker is not None and not any(marker in arg for arg in argv):
                continue
            name = Path(argv[0]).name if argv and argv[0] else ""
            if name == "containerd":
                containerd.append(pid)
            elif name.startswith("containerd-shim"):
                shims.append(pid)
        return cls(dockerd, containerd, shims)

    def ticks(self) -> dict[str, int]:
        return {
            "dockerd": cpu_ticks(self.dockerd),
            "containerd": sum(cpu_ticks(p) for p in self.containerd),
            "shims": sum(cpu_ticks(p) for p in self.shims),
        }


def status(collector: CollectorProcess) -> dict[str, int]:
    """SIGUSR1, then the status line the collector logs."""
    before = collector.log().count(" status: ")
    os.kill(collector.pid, signal.SIGUSR1)

    def logged() -> str | None:
        lines = [line for line in collector.log().splitlines() if " status: " in line]
        return lines[-1] if len(lines) > before else None

    line = wait_until(logged, timeout=10, what="the status line")
    items = (item.partition("=") for item in line.split(" status: ", 1)[1].split())
    return {key: int(value) for key, _, value in items if value.lstrip("-").isdigit()}


def start_containers(engine: Engine, count: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(
            pool.map(lambda n: engine.run("sleep", "1000000", name=f"bench-idle-{n}"), range(count))
        )


def measure(
    engine: Engine,
    pids: EnginePids,
    receiver: CountingReceiver,
    interval: str,
    source: str,
    containers: int,
    window_s: float,
    workdir: Path,
) -> dict[str, float]:
    config = write_config(
        workdir / f"forwarder-{interval}-{source}.toml",
        {
            "docker": {"host": engine.host, "read_from": "tail"},
            "output": {"servers": [receiver.address], "flush_interval": "1s"},
            "state": {"dir": str(workdir / f"state-{interval}-{source}")},
            "stats": {"interval": interval, "source": source},
            "service": {"log_level": "info"},
        },
    )
    collector = CollectorProcess(config, collector_env(engine.env), workdir).start()
    try:
        stats_on = parse_duration(interval).total_seconds() > 0
        wait_until(
            lambda: (
                (s := status(collector))["followers"] == containers
                and (not stats_on or s["stats_records_read"] >= containers)
            ),
            timeout=120,
            what=f"the collector to follow {containers} containers and ship their first stats",
        )
        # One-shot polls come in rounds: start half an interval after one, so that a window
        # of whole intervals holds whole rounds.
        time.sleep(parse_duration(interval).total_seconds() / 2)
        records_before = status(collector).get("stats_records_read", 0)
        engine_before = pids.ticks()
        collector_before = cpu_ticks(collector.pid)
        started = time.monotonic()
        # The measuring window: nothing to wait for but the clock.
        time.sleep(window_s)
        wall_s = time.monotonic() - started
        collector_after = cpu_ticks(collector.pid)
        engine_after = pids.ticks()
        final = status(collector)
    finally:
        collector.stop()
    used = {
        name: (engine_after[name] - engine_before[name]) / CLK_TCK / wall_s * 100
        for name in engine_after
    }
    used["collector"] = (collector_after - collector_before) / CLK_TCK / wall_s * 100
    used["records_per_s"] = (final.get("stats_records_read", 0) - records_before) / wall_s
    used["connections"] = float(final.get("engine_connections", -1))
    used["tasks"] = float(final["tasks"])
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument(
        "--window", type=float, default=30.0, help="seconds measured per run (whole intervals)"
    )
    parser.add_argument("--intervals", nargs="+", default=["0s", "1s", "10s"])
    parser.add_argument(
        "--sources", nargs="+", default=["api", "cgroup"], choices=["api", "cgroup", "auto"]
    )
    parser.add_argument("--docker-host", help="an engine of your own (default: a private one)")
    parser.add_argument("--dockerd-pid", type=int, help="with --docker-host: its dockerd's pid")
    args = parser.parse_args()

    if args.docker_host:
        if args.dockerd_pid is None:
            parser.error("--docker-host needs --dockerd-pid")
        engine = Engine(args.docker_host)
        engine.ensure_image()
        dockerd, marker = args.dockerd_pid, None
    else:
        engine = Engine.start_private()
        dockerd = int((engine.directory / "docker.pid").read_text())
        marker = str(engine.directory)
    receiver = CountingReceiver().start()
    try:
        print(f"starting {args.containers} idle containers ...", flush=True)
        start_containers(engine, args.containers)
        pids = EnginePids.find(dockerd, marker)
        print(
            f"engine: dockerd {pids.dockerd}, containerd {pids.containerd}, "
            f"{len(pids.shims)} shims; window {args.window:g}s; 100 % = one core"
        )
        print(
            f"{'interval':>8} {'source':>7} {'collector':>10} {'dockerd':>8} {'containerd':>10} "
            f"{'engine':>8} {'shims':>7} {'records/s':>10} {'conns':>6} {'tasks':>6}"
        )
        with tempfile.TemporaryDirectory(prefix="bench-stats-") as tmp:
            for interval, source in itertools.product(args.intervals, args.sources):
                if parse_duration(interval).total_seconds() == 0 and source != args.sources[0]:
                    continue  # stats off: the source does not matter
                r = measure(
                    engine,
                    pids,
                    receiver,
                    interval,
                    source,
                    args.containers,
                    args.window,
                    Path(tmp),
                )
                print(
                    f"{interval:>8} {source:>7} {r['collector']:9.2f}% {r['dockerd']:7.2f}% "
                    f"{r['containerd']:9.2f}% {r['dockerd'] + r['containerd']:7.2f}% "
                    f"{r['shims']:6.2f}% {r['records_per_s']:10.1f} {r['connections']:6.0f} "
                    f"{r['tasks']:6.0f}",
                    flush=True,
                )
    finally:
        receiver.stop()
        engine.remove_test_containers(everything=engine.is_private)
        engine.close()


if __name__ == "__main__":
    main()
