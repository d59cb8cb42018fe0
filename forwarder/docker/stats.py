"""Docker Engine Stats API samples turned into the figures ``docker stats`` shows.

Sans-I/O: a sample is the decoded JSON of ``GET /containers/{id}/stats`` (one line of the
stream, or the whole body of a ``stream=false`` request); nothing here reads a socket.

The figures follow the Docker CLI, ``cli/command/container/stats_helpers.go``
(``calculateCPUPercentUnix``, ``calculateMemUsageUnixNoCache``,
``calculateMemPercentUnixNoCache``, ``calculateNetwork``, ``calculateBlockIO``):

- **CPU %**: ``cpu_delta / system_delta * online_cpus * 100``, where the deltas are taken
  between ``cpu_stats`` and ``precpu_stats`` and ``online_cpus`` falls back to the length of
  ``percpu_usage``. As in the CLI a delta that is not positive gives ``0.0``. Unlike the CLI,
  which prints ``0.00%`` then too, we give ``None`` when there is nothing to compare against:
  the first sample of a stream and a ``one-shot`` sample carry an empty ``precpu_stats``.
- **Memory**: usage without the page cache. On cgroup v1 ``usage - total_inactive_file``, on
  cgroup v2 ``usage - inactive_file`` (each only when smaller than usage). Docker 19.03 and
  older subtracted ``cache`` instead; the CLI no longer does, nor do we.
- **Memory %**: ``usage / limit * 100``, and ``0.0`` when the limit is 0 (a container that
  is not running).
- **Network**: bytes and packets summed over every interface of ``networks``; the key is
  absent for ``--network none``.
- **Block I/O**: ``blkio_stats.io_service_bytes_recursive`` summed by the first letter of
  ``op``: ``r``/``R`` is read, ``w``/``W`` is write, anything else (``Sync``, ``Async``,
  ``Discard``, ``Total``) is left out. cgroup v1 engines spell the ops ``Read``/``Write``,
  cgroup v2 engines ``read``/``write``; the list may be ``null``.
- **PIDs**: ``pids_stats.current``, 0 when absent.

Where a sample comes from decides where its previous CPU reading is:

- ``stream=true``: every sample but the first holds the previous one in ``precpu_stats``;
- ``stream=false``: the engine waits one collection interval and fills ``precpu_stats``;
- ``stream=false&one-shot=true``: no wait and no ``precpu_stats``, so CPU is computed against
  the caller's own previous sample (``previous=`` of :func:`stats_event`, or
  :class:`StatsSampler`, which keeps it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from forwarder.records import ContainerInfo, EventTime, StatsEvent
from forwarder.timefmt import TimeFormatError, parse_time_ns

__all__ = [
    "NetworkTotals",
    "StatsSampleError",
    "StatsSampler",
    "block_io_bytes",
    "cpu_percent",
    "memory_percent",
    "memory_usage_no_cache",
    "network_totals",
    "online_cpus",
    "read_time",
    "stats_event",
]


class StatsSampleError(ValueError):
    """The engine sent a stats sample that does not have the Stats API's shape.

    The remote side's fault: the caller logs it and reads the next sample.
    """


class NetworkTotals(NamedTuple):
    """Network counters summed over a container's interfaces."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


_EMPTY: Mapping[str, Any] = {}


def _mapping(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``obj[key]`` as a mapping; absent or ``null`` reads as empty."""
    value = obj.get(key)
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        raise StatsSampleError(f"stats sample: {key!r} is {type(value).__name__}, not an object")
    return value


def _uint(obj: Mapping[str, Any], key: str) -> int:
    """``obj[key]`` as an unsigned integer; absent or ``null`` reads as 0.

    The engine leaves zero counters out (``omitempty``), so absent means 0.
    """
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StatsSampleError(f"stats sample: {key!r} is {value!r}, not an unsigned integer")
    return value


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise StatsSampleError(f"stats sample: {key!r} is {type(value).__name__}, not an array")
    return value


def online_cpus(cpu_stats: Mapping[str, Any]) -> int:
    """The CPUs the container may use: ``online_cpus``, else the length of ``percpu_usage``.

    cgroup v2 engines send no ``percpu_usage``; every current engine sends ``online_cpus``.
    """
    count = _uint(cpu_stats, "online_cpus")
    if count == 0:
        count = len(_list(_mapping(cpu_stats, "cpu_usage"), "percpu_usage"))
    return count


def _has_reading(cpu_stats: Mapping[str, Any]) -> bool:
    """Whether ``cpu_stats`` holds a reading: an empty ``precpu_stats`` has no system usage."""
    return _uint(cpu_stats, "system_cpu_usage") > 0


def cpu_percent(
    cpu_stats: Mapping[str, Any], previous_cpu_stats: Mapping[str, Any]
) -> float | None:
    """CPU use between two ``cpu_stats`` readings, 100 per busy core, as the Docker CLI has it.

    ``None`` when either reading is empty (no ``system_cpu_usage``): there is no period to
    measure over. A CPU or system delta that is not positive gives ``0.0``, as in the CLI (a
    restarted container's counters start again from 0).
    """
    if not (_has_reading(cpu_stats) and _has_reading(previous_cpu_stats)):
        return None
    usage = _mapping(cpu_stats, "cpu_usage")
    previous_usage = _mapping(previous_cpu_stats, "cpu_usage")
    # Converted to float before subtracting, as the CLI's Go code does, so that the figure is
    # the CLI's to the last bit (system_cpu_usage can exceed 2**53 on a many-core host).
    cpu_delta = float(_uint(usage, "total_usage")) - float(_uint(previous_usage, "total_usage"))
    system_delta = float(_uint(cpu_stats, "system_cpu_usage")) - float(
        _uint(previous_cpu_stats, "system_cpu_usage")
    )
    if system_delta > 0.0 and cpu_delta > 0.0:
        return (cpu_delta / system_delta) * float(online_cpus(cpu_stats)) * 100.0
    return 0.0


def memory_usage_no_cache(memory_stats: Mapping[str, Any]) -> int:
    """Memory in use without the page cache (the CLI's ``calculateMemUsageUnixNoCache``).

    cgroup v1: ``usage - total_inactive_file``; cgroup v2: ``usage - inactive_file``. Each is
    subtracted only when smaller than usage. A v1 sample also holds ``inactive_file`` (the
    cgroup's own share, without its children), which the CLI falls back to when
    ``total_inactive_file`` is not smaller than usage; we do the same.
    """
    usage = _uint(memory_stats, "usage")
    stats = _mapping(memory_stats, "stats")
    if "total_inactive_file" in stats:
        inactive = _uint(stats, "total_inactive_file")
        if inactive < usage:
            return usage - inactive
    inactive = _uint(stats, "inactive_file")
    if inactive < usage:
        return usage - inactive
    return usage


def memory_percent(usage_bytes: int, limit_bytes: int) -> float:
    """``usage_bytes / limit_bytes * 100``; ``0.0`` when the limit is 0 (no data yet)."""
    if limit_bytes == 0:
        return 0.0
    return float(usage_bytes) / float(limit_bytes) * 100.0


def network_totals(sample: Mapping[str, Any]) -> NetworkTotals:
    """Bytes and packets summed over ``networks``; zeros when the container has none."""
    rx_bytes = tx_bytes = rx_packets = tx_packets = 0
    networks = _mapping(sample, "networks")
    for name in networks:
        interface = _mapping(networks, name)
        rx_bytes += _uint(interface, "rx_bytes")
        tx_bytes += _uint(interface, "tx_bytes")
        rx_packets += _uint(interface, "rx_packets")
        tx_packets += _uint(interface, "tx_packets")
    return NetworkTotals(rx_bytes, tx_bytes, rx_packets, tx_packets)


def block_io_bytes(blkio_stats: Mapping[str, Any]) -> tuple[int, int]:
    """``(read_bytes, write_bytes)`` from ``io_service_bytes_recursive`` (the CLI's rule).

    An entry counts by the first letter of its ``op``: ``r``/``R`` read, ``w``/``W`` write.
    """
    read_bytes = write_bytes = 0
    for entry in _list(blkio_stats, "io_service_bytes_recursive"):
        if not isinstance(entry, Mapping):
            raise StatsSampleError(f"stats sample: blkio entry {entry!r} is not an object")
        op = entry.get("op") or ""
        if not isinstance(op, str):
            raise StatsSampleError(f"stats sample: blkio op {op!r} is not a string")
        if op[:1] in ("r", "R"):
            read_bytes += _uint(entry, "value")
        elif op[:1] in ("w", "W"):
            write_bytes += _uint(entry, "value")
    return read_bytes, write_bytes


_GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def read_time(sample: Mapping[str, Any]) -> EventTime | None:
    """When the engine took the sample (its ``read``), or ``None`` if it holds no reading.

    A stopped container's sample has Go's zero time, ``0001-01-01T00:00:00Z``.
    """
    value = sample.get("read")
    if value is None or value == _GO_ZERO_TIME:
        return None
    if not isinstance(value, str):
        raise StatsSampleError(f"stats sample: 'read' is {value!r}, not a string")
    try:
        return EventTime.from_ns(parse_time_ns(value))
    except TimeFormatError as exc:
        raise StatsSampleError(f"stats sample: 'read' is {value!r}, not an RFC 3339 time") from exc


def stats_event(
    container: ContainerInfo,
    sample: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
) -> StatsEvent:
    """The :class:`StatsEvent` for one Stats API ``sample`` of ``container``.

    CPU is computed against the sample's own ``precpu_stats``; when that is empty (the first
    sample of a stream, a one-shot sample), against the ``cpu_stats`` of ``previous``, an
    earlier sample of the same container; failing both, ``cpu_percent`` is ``None``.

    Raises :class:`StatsSampleError` when the sample is not of the Stats API's shape, and
    :class:`ValueError` when it names another container (the caller's mistake).
    """
    sample_id = sample.get("id")
    if sample_id is not None and sample_id != container.id:
        raise ValueError(f"stats sample of container {sample_id!r} given for {container.id!r}")
    cpu_stats = _mapping(sample, "cpu_stats")
    previous_cpu_stats = _mapping(sample, "precpu_stats")
    if not _has_reading(previous_cpu_stats) and previous is not None:
        previous_cpu_stats = _mapping(previous, "cpu_stats")
    cpus = online_cpus(cpu_stats)
    memory_stats = _mapping(sample, "memory_stats")
    usage_bytes = memory_usage_no_cache(memory_stats)
    limit_bytes = _uint(memory_stats, "limit")
    network = network_totals(sample)
    read_bytes, write_bytes = block_io_bytes(_mapping(sample, "blkio_stats"))
    return StatsEvent(
        container_id=container.id,
        container_name=container.name,
        image=container.image,
        cpu_percent=cpu_percent(cpu_stats, previous_cpu_stats),
        online_cpus=cpus or None,
        memory_usage_bytes=usage_bytes,
        memory_limit_bytes=limit_bytes,
        memory_percent=memory_percent(usage_bytes, limit_bytes),
        network_rx_bytes=network.rx_bytes,
        network_tx_bytes=network.tx_bytes,
        network_rx_packets=network.rx_packets,
        network_tx_packets=network.tx_packets,
        block_read_bytes=read_bytes,
        block_write_bytes=write_bytes,
        pids=_uint(_mapping(sample, "pids_stats"), "current"),
    )


class StatsSampler:
    """One container's stream of samples, from ``stream=true`` or from polling.

    It keeps the last sample that held a CPU reading, so that one-shot samples (no
    ``precpu_stats``) get a CPU figure from the second on. A sample without a reading (the
    container stopped) forgets it: the next run's counters start again from 0, and comparing
    them with the last run's would give a figure over the wrong period.
    """

    def __init__(self, container: ContainerInfo) -> None:
        self.container = container
        self._previous: Mapping[str, Any] | None = None

    @property
    def primed(self) -> bool:
        """Whether the next sample gets a CPU figure even without its own ``precpu_stats``."""
        return self._previous is not None

    def feed(self, sample: Mapping[str, Any]) -> StatsEvent:
        """The event for ``sample``; the sample becomes the previous one for the next."""
        event = stats_event(self.container, sample, self._previous)
        self._previous = sample if _has_reading(_mapping(sample, "cpu_stats")) else None
        return event

    def __repr__(self) -> str:
        state = "primed" if self.primed else "unprimed"
        return f"<StatsSampler {self.container.name} {state}>"
