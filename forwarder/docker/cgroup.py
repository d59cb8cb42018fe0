"""Stats samples read from the host's cgroup files instead of the Stats API.

The engine's Stats API reads these same files (moby 20.10, ``daemon/daemon_unix.go``
``statsV1``/``statsV2`` through containerd's ``cgroups``) and costs dockerd and containerd a
request per container per interval. Here the files are read directly and turned into a sample
of the Stats API's shape, so that :func:`forwarder.docker.stats.stats_event` computes the
same figures with the same formulas:

- CPU: v1 ``cpuacct.usage`` (ns) and ``cpuacct.usage_percpu``; v2 ``cpu.stat``
  ``usage_usec`` x 1000. ``system_cpu_usage`` is the engine's: the first seven fields of
  ``/proc/stat``'s ``cpu`` line, in clock ticks (USER_HZ = 100), as ns. ``online_cpus`` is
  the host's online CPUs, as the engine's ``sysconf(_SC_NPROCESSORS_ONLN)``.
- Memory: v1 ``memory.usage_in_bytes``, ``memory.limit_in_bytes``, ``memory.stat``; v2
  ``memory.current``, ``memory.max``, ``memory.stat``. A limit above the host's memory
  (``MemTotal``), or v2's ``max``, is the host's memory, as the engine has it.
- PIDs: ``pids.current``.
- Block I/O: v1 ``blkio.io_service_bytes_recursive``, else (no CFQ) the ``throttle.`` one,
  as containerd reads them; v2 ``io.stat`` ``rbytes``/``wbytes`` as ``read``/``write``.
- Network: ``/proc/<pid>/net/dev`` of the container's init process, every interface but
  ``lo`` (the engine reports its sandbox's interfaces, none for ``--network none``).

The parsers are pure functions of file text; :class:`CgroupFiles` is the thin reading layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from forwarder.timefmt import format_time

__all__ = [
    "CgroupFiles",
    "CgroupUnavailableError",
    "locate",
    "parse_blkio_v1",
    "parse_cgroup_paths",
    "parse_flat",
    "parse_io_stat",
    "parse_meminfo_total",
    "parse_net_dev",
    "parse_proc_stat_ns",
    "sample_v1",
    "sample_v2",
]

USER_HZ: Final = 100
"""Clock ticks per second of ``/proc/stat`` on Linux (the engine's ``clockTicksPerSecond``)."""
_NS_PER_TICK: Final = 1_000_000_000 // USER_HZ


class CgroupUnavailableError(OSError):
    """A container's cgroup files can't be read here (not mounted, not this host's, gone)."""


def parse_flat(text: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``, ``cpu.stat``) as a dict; other lines skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _single(text: str) -> int:
    return int(text.split()[0])


def parse_blkio_v1(text: str) -> list[dict[str, Any]]:
    """``MAJ:MIN Op value`` lines as the API's ``io_service_bytes_recursive`` entries."""
    entries: list[dict[str, Any]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and ":" in fields[0]:
            major, _, minor = fields[0].partition(":")
            entries.append(
                {"major": int(major), "minor": int(minor), "op": fields[1], "value": int(fields[2])}
            )
    return entries


def parse_io_stat(text: str) -> list[dict[str, Any]]:
    """v2 ``io.stat`` (``MAJ:MIN rbytes=N wbytes=N ...``) as ``read``/``write`` entries,
    as the engine converts it."""
    entries: list[dict[str, Any]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or ":" not in fields[0]:
            continue
        major, _, minor = fields[0].partition(":")
        for item in fields[1:]:
            key, _, value = item.partition("=")
            op = {"rbytes": "read", "wbytes": "write"}.get(key)
            if op is not None:
                entries.append(
                    {"major": int(major), "minor": int(minor), "op": op, "value": int(value)}
                )
    return entries


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """``/proc/<pid>/net/dev`` as the API's ``networks``, ``lo`` left out."""
    networks: dict[str, dict[str, int]] = {}
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        name = name.strip()
        fields = counters.split()
        if name == "lo" or len(fields) < 16:
            continue
        networks[name] = {
            "rx_bytes": int(fields[0]),
            "rx_packets": int(fields[1]),
            "rx_errors": int(fields[2]),
            "rx_dropped": int(fields[3]),
            "tx_bytes": int(fields[8]),
            "tx_packets": int(fields[9]),
            "tx_errors": int(fields[10]),
            "tx_dropped": int(fields[11]),
        }
    return networks


def parse_proc_stat_ns(text: str) -> int:
    """The engine's ``system_cpu_usage``: user..softirq of ``/proc/stat``'s ``cpu`` line, ns."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return sum(int(f) for f in fields[1:8]) * _NS_PER_TICK
    raise ValueError("/proc/stat has no 'cpu' line")


def parse_meminfo_total(text: str) -> int:
    """``MemTotal`` of ``/proc/meminfo`` in bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError("/proc/meminfo has no MemTotal")


def parse_cgroup_paths(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as controller -> path; the v2 hierarchy's key is ``""``."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def _cpu_stats(total_ns: int, percpu: list[int] | None, system_ns: int, cpus: int) -> Any:
    usage: dict[str, Any] = {"total_usage": total_ns}
    if percpu is not None:
        usage["percpu_usage"] = percpu
    return {"cpu_usage": usage, "system_cpu_usage": system_ns, "online_cpus": cpus}


def sample_v1(
    files: Mapping[str, str], *, read_ns: int, system_ns: int, online_cpus: int, host_memory: int
) -> dict[str, Any]:
    """A Stats API sample from cgroup v1 files, keyed by file name (``cpuacct.usage``,
    ``cpuacct.usage_percpu``, ``memory.usage_in_bytes``, ``memory.limit_in_bytes``,
    ``memory.stat``, ``pids.current``, ``blkio.io_service_bytes_recursive``,
    ``blkio.throttle.io_service_bytes_recursive``, ``net/dev``). Missing ones read as 0."""
    percpu = [int(v) for v in files.get("cpuacct.usage_percpu", "").split()]
    limit = _single(files.get("memory.limit_in_bytes", "0"))
    blkio = parse_blkio_v1(files.get("blkio.io_service_bytes_recursive", ""))
    if not blkio:
        blkio = parse_blkio_v1(files.get("blkio.throttle.io_service_bytes_recursive", ""))
    return _sample(
        read_ns=read_ns,
        cpu=_cpu_stats(
            _single(files.get("cpuacct.usage", "0")), percpu or None, system_ns, online_cpus
        ),
        usage=_single(files.get("memory.usage_in_bytes", "0")),
        limit=min(limit, host_memory) if host_memory > 0 else limit,
        memory_stat=parse_flat(files.get("memory.stat", "")),
        pids=_single(files.get("pids.current", "0")),
        blkio=blkio,
        net_dev=files.get("net/dev"),
    )


def sample_v2(
    files: Mapping[str, str], *, read_ns: int, system_ns: int, online_cpus: int, host_memory: int
) -> dict[str, Any]:
    """A Stats API sample from cgroup v2 files (``cpu.stat``, ``memory.current``,
    ``memory.max``, ``memory.stat``, ``pids.current``, ``io.stat``, ``net/dev``)."""
    limit_text = files.get("memory.max", "max").strip()
    limit = host_memory if limit_text == "max" else int(limit_text)
    if host_memory > 0:
        limit = min(limit, host_memory)
    cpu_stat = parse_flat(files.get("cpu.stat", ""))
    return _sample(
        read_ns=read_ns,
        cpu=_cpu_stats(cpu_stat.get("usage_usec", 0) * 1000, None, system_ns, online_cpus),
        usage=_single(files.get("memory.current", "0")),
        limit=limit,
        memory_stat=parse_flat(files.get("memory.stat", "")),
        pids=_single(files.get("pids.current", "0")),
        blkio=parse_io_stat(files.get("io.stat", "")),
        net_dev=files.get("net/dev"),
    )


def _sample(
    *,
    read_ns: int,
    cpu: Any,
    usage: int,
    limit: int,
    memory_stat: dict[str, int],
    pids: int,
    blkio: list[dict[str, Any]],
    net_dev: str | None,
) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "read": format_time(read_ns),
        "cpu_stats": cpu,
        "memory_stats": {"usage": usage, "limit": limit, "stats": memory_stat},
        "pids_stats": {"current": pids},
        "blkio_stats": {"io_service_bytes_recursive": blkio},
    }
    networks = parse_net_dev(net_dev) if net_dev is not None else {}
    if networks:
        sample["networks"] = networks
    return sample


_V1_FILES: Final = {
    "cpuacct": ("cpuacct.usage", "cpuacct.usage_percpu"),
    "memory": ("memory.usage_in_bytes", "memory.limit_in_bytes", "memory.stat"),
    "pids": ("pids.current",),
    "blkio": ("blkio.io_service_bytes_recursive", "blkio.throttle.io_service_bytes_recursive"),
}
_V2_FILES: Final = ("cpu.stat", "memory.current", "memory.max", "memory.stat", "pids.current")
_V2_OPTIONAL: Final = ("io.stat",)


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


class CgroupFiles:
    """Where one container's cgroup files are, and a :meth:`sample` read from them."""

    def __init__(
        self,
        files: dict[str, Path],
        *,
        version: int,
        proc_root: Path,
        pid: int,
    ) -> None:
        self.files = files
        self.version = version
        self.proc_root = proc_root
        self.pid = pid

    def __repr__(self) -> str:
        return f"<CgroupFiles v{self.version} pid={self.pid} files={len(self.files)}>"

    def sample(self, *, read_ns: int) -> dict[str, Any]:
        """Read the files now; :class:`CgroupUnavailableError` when they are gone (the
        container stopped: its cgroup is removed)."""
        try:
            texts = {name: _read(path) for name, path in self.files.items()}
            texts["net/dev"] = _read(self.proc_root / str(self.pid) / "net" / "dev")
            system_ns = parse_proc_stat_ns(_read(self.proc_root / "stat"))
            host_memory = parse_meminfo_total(_read(self.proc_root / "meminfo"))
        except OSError as exc:
            raise CgroupUnavailableError(f"cgroup files of pid {self.pid}: {exc}") from exc
        build = sample_v2 if self.version == 2 else sample_v1
        return build(
            texts,
            read_ns=read_ns,
            system_ns=system_ns,
            online_cpus=os.sysconf("SC_NPROCESSORS_ONLN"),
            host_memory=host_memory,
        )


def locate(pid: int, *, cgroup_root: Path, proc_root: Path) -> CgroupFiles:
    """The cgroup files of the process ``pid`` (a container's init process, from inspect):
    v2 when ``cgroup_root`` is a unified hierarchy, else v1 controllers under it."""
    try:
        paths = parse_cgroup_paths(_read(proc_root / str(pid) / "cgroup"))
    except OSError as exc:
        raise CgroupUnavailableError(f"{proc_root}/{pid}/cgroup: {exc}") from exc
    files: dict[str, Path] = {}
    if (cgroup_root / "cgroup.controllers").exists():
        directory = cgroup_root / paths.get("", "/").lstrip("/")
        for name in _V2_FILES:
            files[name] = directory / name
        for name in _V2_OPTIONAL:
            if (directory / name).exists():
                files[name] = directory / name
        version = 2
    else:
        for controller, names in _V1_FILES.items():
            if controller not in paths:
                raise CgroupUnavailableError(f"pid {pid} has no {controller} cgroup")
            directory = cgroup_root / controller / paths[controller].lstrip("/")
            for name in names:
                if (directory / name).exists():
                    files[name] = directory / name
        version = 1
    missing = [n for n in ("memory.stat", "pids.current") if n not in files]
    if missing or not all(path.exists() for path in files.values()):
        raise CgroupUnavailableError(f"pid {pid}: cgroup files not readable under {cgroup_root}")
    return CgroupFiles(files, version=version, proc_root=proc_root, pid=pid)
