"""How should the collector get Stats API samples? Measure the CPU each way costs.

Three ways to get one sample per container per interval:

- ``stream``: one ``stream=true`` request per container, held open. The engine sends a
  sample every second, each with ``precpu_stats``; the client keeps one per interval.
- ``poll``: a ``stream=false`` request per container per interval. The engine takes two
  samples one collection interval (1 s) apart, to fill ``precpu_stats``, so a request takes
  1 to 2 s.
- ``oneshot``: a ``stream=false&one-shot=true`` request per container per interval. The
  engine reads once and answers at once, without ``precpu_stats``; CPU is computed against
  the client's own previous sample (:class:`forwarder.docker.stats.StatsSampler`).

For each way and interval, the script runs for ``--duration`` seconds against ``--containers``
idle containers, then reports the CPU time (utime + stime from ``/proc/<pid>/stat``) that
these processes used over the run:

- dockerd;
- its containerd;
- the containers' runc shims, which read the cgroup files for containerd's Metrics call;
- this client process, which includes the HTTP and JSON work and the stats math.

A first run with no requests at all gives the engine's idle baseline.

Run it against a private engine, with no images pulled (see ``--image``), e.g.::

    python bench/bench_stats_modes.py --socket $D/docker.sock --dockerd-pid $(cat $D/docker.pid)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from forwarder.docker.stats import StatsSampler
from forwarder.records import ContainerInfo

API = "http://docker/v1.41"
LABEL = "forwarder.bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def shims_of(container_ids: list[str]) -> list[int]:
    wanted = set(container_ids)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_shim = argv[0].endswith(b"containerd-shim-runc-v2") and b"-id" in argv
        if is_shim and argv[argv.index(b"-id") + 1].decode() in wanted:
            found.append(int(entry.name))
    return found


@dataclass
class Meters:
    groups: dict[str, list[int]]

    def read(self) -> dict[str, int]:
        return {name: sum(cpu_ticks(pid) for pid in pids) for name, pids in self.groups.items()}


@dataclass
class Run:
    mode: str
    interval_s: float
    events: int = 0
    samples: int = 0
    cpu_figures: int = 0
    latencies_s: list[float] = field(default_factory=list)


async def create_containers(
    session: aiohttp.ClientSession, image: str, count: int
) -> list[ContainerInfo]:
    infos = []
    for i in range(count):
        body = {
            "Image": image,
            "Cmd": ["sleep", "1000000"],
            "Labels": {LABEL: "stats"},
            "HostConfig": {"NetworkMode": "none"},
        }
        name = f"bench-stats-{os.getpid()}-{i}"
        async with session.post(f"{API}/containers/create", params={"name": name}, json=body) as r:
            r.raise_for_status()
            cid = (await r.json())["Id"]
        async with session.post(f"{API}/containers/{cid}/start") as r:
            r.raise_for_status()
        infos.append(ContainerInfo(id=cid, name=f"/{name}", image=image, running=True))
    return infos


async def remove_containers(session: aiohttp.ClientSession, infos: list[ContainerInfo]) -> None:
    for info in infos:
        async with session.delete(f"{API}/containers/{info.id}", params={"force": "1"}) as r:
            r.raise_for_status()


async def stream_one(
    session: aiohttp.ClientSession, info: ContainerInfo, run: Run, deadline: float
) -> None:
    sampler = StatsSampler(info)
    next_emit = 0.0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    url = f"{API}/containers/{info.id}/stats"
    async with session.get(url, params={"stream": "1"}, timeout=timeout) as r:
        r.raise_for_status()
        while time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(r.content.readline(), deadline - time.monotonic())
            except TimeoutError:
                break
            if not line:
                break
            sample = json.loads(line)
            run.samples += 1
            event = sampler.feed(sample)  # fed every sample: the next one's precpu is its own
            now = time.monotonic()
            if now >= next_emit:
                next_emit = now + run.interval_s
                run.events += 1
                run.cpu_figures += event.cpu_percent is not None


async def poll_one(
    session: aiohttp.ClientSession,
    info: ContainerInfo,
    run: Run,
    deadline: float,
    params: dict[str, str],
) -> None:
    sampler = StatsSampler(info)
    url = f"{API}/containers/{info.id}/stats"
    next_start = time.monotonic()
    while next_start < deadline:
        await asyncio.sleep(max(0.0, next_start - time.monotonic()))
        started = time.monotonic()
        async with session.get(url, params=params) as r:
            r.raise_for_status()
            sample = await r.json()
        run.latencies_s.append(time.monotonic() - started)
        run.samples += 1
        event = sampler.feed(sample)
        run.events += 1
        run.cpu_figures += event.cpu_percent is not None
        next_start = max(next_start + run.interval_s, time.monotonic())


async def measure(
    meters: Meters, duration_s: float, body: Callable[[float], Awaitable[Any]]
) -> dict[str, float]:
    engine_before = meters.read()
    client_before = cpu_ticks(os.getpid())
    wall_before = time.monotonic()
    await body(wall_before + duration_s)
    # Polls end with the last one that starts before the deadline: wait out the rest, so
    # that every run is measured over the same wall time (longer if a request overran).
    await asyncio.sleep(max(0.0, wall_before + duration_s - time.monotonic()))
    wall_s = time.monotonic() - wall_before
    engine_after = meters.read()
    client_after = cpu_ticks(os.getpid())
    used = {name: (engine_after[name] - engine_before[name]) / CLK_TCK for name in engine_after}
    used["client"] = (client_after - client_before) / CLK_TCK
    used["wall"] = wall_s
    return used


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", required=True, help="the engine's unix socket")
    parser.add_argument("--dockerd-pid", type=int, required=True)
    parser.add_argument("--image", default="busybox:local", help="an image with sleep")
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--intervals", default="1,10", help="seconds, comma-separated")
    parser.add_argument("--modes", default="stream,poll,oneshot")
    args = parser.parse_args()

    connector = aiohttp.UnixConnector(path=args.socket, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        infos = await create_containers(session, args.image, args.containers)
        try:
            meters = Meters(
                {
                    "dockerd": [args.dockerd_pid],
                    "containerd": children(args.dockerd_pid),
                    "shims": shims_of([info.id for info in infos]),
                }
            )
            print(
                f"{args.containers} idle containers, {args.duration:.0f} s per run, "
                f"{os.cpu_count()} CPUs, CPU seconds from /proc/<pid>/stat "
                f"(tick {1000 / CLK_TCK:.0f} ms); shims found: {len(meters.groups['shims'])}"
            )

            async def idle(deadline: float) -> None:
                await asyncio.sleep(deadline - time.monotonic())

            rows = [
                ("baseline", "-", Run("baseline", 0), await measure(meters, args.duration, idle))
            ]
            for interval in (float(i) for i in args.intervals.split(",")):
                for mode in args.modes.split(","):
                    run = Run(mode, interval)

                    async def body(deadline: float, run: Run = run, mode: str = mode) -> None:
                        if mode == "stream":
                            tasks = [stream_one(session, i, run, deadline) for i in infos]
                        else:
                            params = {"stream": "0"}
                            if mode == "oneshot":
                                params["one-shot"] = "1"
                            tasks = [poll_one(session, i, run, deadline, params) for i in infos]
                        await asyncio.gather(*tasks)

                    rows.append(
                        (mode, f"{interval:g}", run, await measure(meters, args.duration, body))
                    )
        finally:
            await remove_containers(session, infos)

    header = (
        f"{'mode':9} {'every':>5} {'wall':>5} {'events':>6} {'samples':>7} {'cpu%':>5} "
        f"{'latency':>13} {'dockerd':>7} {'ctrd':>5} {'shims':>5} {'engine':>6} "
        f"{'eng/ev':>7} {'client':>6} {'cli/ev':>7}"
    )
    print(header)
    print("-" * len(header))
    for mode, every, run, used in rows:
        engine = used["dockerd"] + used["containerd"] + used["shims"]
        per_event = f"{engine / run.events * 1000:6.2f}m" if run.events else "      -"
        client_per_event = (
            f"{used['client'] / run.events * 1000:6.2f}m" if run.events else "      -"
        )
        latency = (
            f"{statistics.mean(run.latencies_s):5.2f}/{max(run.latencies_s):5.2f}s"
            if run.latencies_s
            else "-"
        )
        print(
            f"{mode:9} {every:>5} {used['wall']:5.1f} {run.events:6} {run.samples:7} "
            f"{run.cpu_figures:5} {latency:>13} {used['dockerd']:7.2f} {used['containerd']:5.2f} "
            f"{used['shims']:5.2f} {engine:6.2f} {per_event} {used['client']:6.2f} "
            f"{client_per_event}"
        )
    print(
        "CPU columns are seconds over the run; eng/ev and cli/ev are CPU ms per event; "
        "cpu% counts events with a CPU figure; latency is mean/max per request."
    )


if __name__ == "__main__":
    asyncio.run(main())
