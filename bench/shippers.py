"""What bench_pipeline.py and bench_steady.py share: the shippers under test and their costs.

- Process costs from ``/proc``: CPU (utime + stime, every thread), current and peak RSS.
- The engine's own processes (dockerd and, for a private engine, its containerd), whose CPU
  is what serving the Engine API costs.
- ``forwarder run`` with a given ``[docker] log_source`` ("api", "file"), and a check of
  whether this forwarder knows that key at all (``forwarder check`` on a config that sets it).
- Fluent Bit, when ``$FLUENT_BIT`` names its binary: the ``tail`` input with the ``docker``
  parser (as in Fluent Bit's ``conf/parsers.conf``), shipping with its ``forward`` output and
  ``Require_ack_response`` to a Forward receiver of ours.
- :class:`LatencyReceiver`: a counting receiver that also takes, for every entry, its arrival
  time minus its record time (the engine's timestamp of the line).

Nothing here asserts a figure: the scripts print them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness.collector import (  # noqa: E402
    CollectorProcess,
    collector_env,
    write_config,
)
from tests.harness.engine import Engine  # noqa: E402
from tests.harness.receivers import (  # noqa: E402
    CountingReceiver,
    ForwardEntries,
    SenderProtocolError,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
FLUENT_BIT_ENV = "FLUENT_BIT"
# The `docker` parser of Fluent Bit's conf/parsers.conf (v4.2), verbatim in meaning.
FLUENT_BIT_DOCKER_PARSER = """\
[PARSER]
    Name         docker
    Format       json
    Time_Key     time
    Time_Format  %Y-%m-%dT%H:%M:%S.%L
    Time_Keep    On
"""


# ---- process costs -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had."""
    return _status_kib(pid, "VmHWM:")


def rss_kib(pid: int) -> int:
    """VmRSS: the resident memory now."""
    return _status_kib(pid, "VmRSS:")


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def engine_pids(engine: Engine, dockerd_pid: int | None = None) -> dict[str, int]:
    """dockerd's pid and, when it runs one of its own, its containerd's.

    A private engine's dockerd wrote its pid file in its directory; for an external engine
    the pid must be given (``dockerd_pid``), else no engine CPU is reported.
    """
    pid = dockerd_pid
    if pid is None and engine.is_private:
        pid_file = engine.directory / "docker.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().strip())
    if pid is None:
        return {}
    pids = {"dockerd": pid}
    for entry in Path("/proc").iterdir():
        child = int(entry.name) if entry.name.isdigit() else 0
        if child and _parent_of(child) == pid and _comm(child) == "containerd":
            pids["containerd"] = child
    return pids


@dataclass
class CpuWindow:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`."""

    pids: Mapping[str, int]

    def start(self) -> CpuWindow:
        self._wall = time.monotonic()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> CpuWindow:
        self.elapsed = time.monotonic() - self._wall
        self.used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        return self

    @property
    def total(self) -> float:
        return sum(self.used.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {cpu:.2f}s" for name, cpu in self.used.items()) or "-"


# ---- forwarder ----------------------------------------------------------------------------


def log_source_known(engine: Engine, source: str) -> bool:
    """Whether this forwarder accepts ``[docker] log_source = source`` (``forwarder check``)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(
            Path(tmp) / "check.toml", {"docker": {"host": engine.host, "log_source": source}}
        )
        result = subprocess.run(
            [sys.executable, "-m", "forwarder.cli", "check", "--config", str(config)],
            env=collector_env(engine.env),
            capture_output=True,
            timeout=60,
            check=False,
        )
    return result.returncode == 0


def forwarder_sections(
    engine: Engine,
    receiver: CountingReceiver,
    state_dir: Path,
    *,
    log_source: str | None,
    docker: Mapping[str, Any] | None = None,
    output: Mapping[str, Any] | None = None,
    stats_interval: str = "0s",
    http_listen: str = "",
) -> dict[str, dict[str, Any]]:
    """A forwarder config shipping to ``receiver``; ``log_source`` None leaves the key out.
    The metrics listener is off unless ``http_listen`` names an address."""
    docker_keys: dict[str, Any] = {"host": engine.host, **(docker or {})}
    if log_source is not None:
        docker_keys["log_source"] = log_source
    return {
        "docker": docker_keys,
        "output": {"servers": [receiver.address], "compress": "none", **(output or {})},
        "state": {"dir": str(state_dir)},
        "stats": {"interval": stats_interval},
        "service": {"http_listen": http_listen},
    }


def start_forwarder(
    workdir: Path, sections: dict[str, dict[str, Any]], env: dict[str, str]
) -> CollectorProcess:
    """``forwarder run`` on the config; returns once it has logged that it runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "forwarder.toml", sections)
    return CollectorProcess(config, collector_env(env), workdir).start()


# ---- Fluent Bit ---------------------------------------------------------------------------


def fluent_bit_binary() -> Path | None:
    """The Fluent Bit binary $FLUENT_BIT names, if it is set and executable."""
    value = os.environ.get(FLUENT_BIT_ENV)
    if not value:
        return None
    path = Path(value) if "/" in value else Path(shutil.which(value) or value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SystemExit(f"${FLUENT_BIT_ENV}={value} is not an executable file")
    return path


class FluentBit:
    """Fluent Bit: ``tail`` (``docker`` parser) over ``path`` -> ``forward`` with acks.

    ``path`` may be a glob. Positions go to a DB in ``workdir`` (as a deployment keeps them);
    ``flush_s`` is the [SERVICE] Flush, the longest a record waits for its chunk to be sent.
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        path: str,
        receiver: CountingReceiver,
        *,
        flush_s: float,
        read_from_head: bool,
        mem_buf_limit: str = "64MB",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        parsers = workdir / "parsers.conf"
        parsers.write_text(FLUENT_BIT_DOCKER_PARSER)
        self.config = workdir / "fluent-bit.conf"
        self.config.write_text(
            "[SERVICE]\n"
            f"    Flush        {flush_s:g}\n"
            "    Log_Level    warn\n"
            f"    Parsers_File {parsers}\n"
            "[INPUT]\n"
            "    Name             tail\n"
            f"    Path             {path}\n"
            "    Tag              docker.*\n"
            "    Parser           docker\n"
            f"    Read_from_Head   {'On' if read_from_head else 'Off'}\n"
            f"    DB               {workdir / 'tail.db'}\n"
            f"    Mem_Buf_Limit    {mem_buf_limit}\n"
            "    Refresh_Interval 1\n"
            "[OUTPUT]\n"
            "    Name                 forward\n"
            "    Match                *\n"
            f"    Host                 {receiver.host}\n"
            f"    Port                 {receiver.port}\n"
            "    Require_ack_response true\n"
        )
        self.binary = binary
        self.log_path = workdir / "fluent-bit.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FluentBit:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---- latency ------------------------------------------------------------------------------


def _event_seconds(code: int, data: bytes) -> object:
    if code == 0 and len(data) == 8:
        seconds, nanoseconds = struct.unpack(">II", data)
        return seconds + nanoseconds / 1e9
    return msgpack.ExtType(code, data)


def _stamp_seconds(entry: object) -> float:
    """An entry's record time in epoch seconds: ``[time, record]``, or Fluent Bit's
    ``[[time, metadata], record]``; time an EventTime (decoded or not) or an integer."""
    if not isinstance(entry, list) or not entry:
        raise SenderProtocolError(f"not a Forward entry: {entry!r:.100}")
    stamp = entry[0]
    if isinstance(stamp, list) and stamp:
        stamp = stamp[0]
    if isinstance(stamp, msgpack.ExtType):
        stamp = _event_seconds(stamp.code, stamp.data)
    if not isinstance(stamp, int | float):
        raise SenderProtocolError(f"an entry time of {stamp!r:.100}")
    return float(stamp)


def entry_times(payload: bytes) -> list[float]:
    """The record times (epoch seconds) of a PackedForward payload's entries."""
    unpacker = msgpack.Unpacker(
        raw=True, ext_hook=_event_seconds, max_buffer_size=max(len(payload), 1024)
    )
    unpacker.feed(payload)
    return [_stamp_seconds(entry) for entry in unpacker]


class LatencyReceiver(CountingReceiver):
    """A :class:`CountingReceiver` that, while :attr:`measuring`, keeps every entry's
    arrival wall-clock time minus its record time, in seconds (:attr:`latencies`)."""

    def __init__(self) -> None:
        super().__init__()
        self.measuring = threading.Event()
        self.latencies: list[float] = []

    def __enter__(self) -> LatencyReceiver:
        super().__enter__()
        return self

    def _on_message(self, sock: Any, conn_id: int, obj: object) -> None:
        arrived = time.time()
        super()._on_message(sock, conn_id, obj)
        if not self.measuring.is_set() or not isinstance(obj, list) or len(obj) < 2:
            return
        second = obj[1]
        if isinstance(second, ForwardEntries):
            times = entry_times(second.payload)
        elif isinstance(second, bytes):
            times = entry_times(second)
        elif isinstance(second, list):
            times = [_stamp_seconds(entry) for entry in second]
        else:
            times = []
        with self._lock:
            self.latencies.extend(arrived - t for t in times)


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]
