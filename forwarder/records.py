"""The records forwarder ships, as pydantic models.

Each model is the *record map* of a Forward entry; the entry's time travels beside it as an
:class:`EventTime`. The JSON Schemas in ``schemas/`` are generated from these models.

The log hot path does not build one model per line: :mod:`forwarder.forward.protocol` packs
the same four keys straight into msgpack, and a test checks that every packed record validates
against :class:`LogEvent`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, NamedTuple, NewType

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

RecordKind = Literal["log", "stats", "lifecycle"]
"""What a chunk's records are: the chunk assembler never mixes kinds in one chunk."""

RecordsSink = Callable[[str, list[tuple[int, dict[str, Any]]]], Awaitable[None]]
"""Where a source hands records other than log lines (stats, lifecycle): a tag and
``(ts_ns, record map)`` pairs."""

ContainerId = NewType("ContainerId", str)
"""A full 64-hex-digit container id."""

ContainerIdStr = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ContainerNameStr = Annotated[str, StringConstraints(pattern=r"^/.+")]


class EventTime(NamedTuple):
    """A Forward EventTime: whole seconds since the epoch and the nanoseconds within it."""

    seconds: int
    nanoseconds: int

    @classmethod
    def from_ns(cls, ts_ns: int) -> EventTime:
        return cls(*divmod(ts_ns, 1_000_000_000))

    @property
    def ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nanoseconds


class Position(NamedTuple):
    """How far a container's log has been taken.

    ``ts_ns`` is the engine timestamp of the last line taken, and ``taken`` is how many lines
    carrying exactly that nanosecond were taken, since several lines can share one: every
    source understands that part.

    A file source adds where it stands in the file, exact to the byte: the file's identity
    (``dev``, ``ino``, and the ``fingerprint`` of its first line, ``-1`` when not known yet),
    the byte ``offset`` at which its line joiner last held nothing (``-1``: no file part),
    and ``skip``, how many joined lines were taken from there on (a long line's pieces can
    still be pending in the joiner: they are not taken, so the offset stays before them).
    Resuming there seeks to ``offset`` and drops the first ``skip`` lines.
    """

    ts_ns: int
    taken: int
    dev: int = 0
    ino: int = 0
    fingerprint: int = -1
    offset: int = -1
    skip: int = 0

    @property
    def in_file(self) -> bool:
        """It carries a file position."""
        return self.offset >= 0

    def later_than(self, other: Position) -> bool:
        """Further on than ``other``: a later (ts, taken), or the same one reached by reading
        further (a file part that differs)."""
        if (self.ts_ns, self.taken) != (other.ts_ns, other.taken):
            return (self.ts_ns, self.taken) > (other.ts_ns, other.taken)
        return self != other

    def to_list(self) -> list[int]:
        """As saved: ``[ts_ns, taken]``, and the file part when there is one."""
        return list(self) if self.in_file else [self.ts_ns, self.taken]

    @classmethod
    def from_list(cls, value: Any) -> Position:
        """From :meth:`to_list` (or the two-item form saved before file positions)."""
        if len(value) >= 7 and int(value[5]) >= 0:
            return cls(*(int(v) for v in value[:7]))
        return cls(int(value[0]), int(value[1]))


class RawLine(NamedTuple):
    """One engine message: a whole line, or a piece of a long one."""

    source: str
    """``"stdout"`` or ``"stderr"`` (the :data:`STDOUT`/:data:`STDERR` constants)."""
    ts_ns: int
    """The engine timestamp, nanoseconds since the epoch."""
    data: bytes
    """The message without its timestamp and without the trailing ``\\n`` (``\\r\\n`` on a TTY)."""
    partial: bool
    """True when the message had no trailing newline: a piece of a longer line, or a tail."""


class LogLine(NamedTuple):
    """One whole (joined) line, decoded."""

    source: str
    ts_ns: int
    """The timestamp of the line's first piece, which is also that of all its pieces."""
    text: str
    """UTF-8 decoded, invalid bytes replaced by U+FFFD."""


class ContainerInfo(BaseModel):
    """What forwarder knows about a container, from list and inspect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: ContainerIdStr
    name: ContainerNameStr = Field(description="The container's name with its leading '/'.")
    image: str = Field(default="", description="The image name the container was created from.")
    image_id: str = Field(default="", description="The image id, e.g. 'sha256:...'.")
    tty: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    env: tuple[str, ...] = Field(
        default=(), repr=False, description="Config.Env: NAME=value entries (may hold secrets)."
    )
    log_driver: str = ""
    log_path: str = Field(
        default="", description="Where the engine writes its json-file log (inspect's LogPath)."
    )
    started_at_ns: int = 0
    finished_at_ns: int = 0
    running: bool = False

    @property
    def cid(self) -> ContainerId:
        return ContainerId(self.id)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def record(self) -> dict[str, object]:
        """The Forward record map: every set field, ``None`` fields left out."""
        return self.model_dump(exclude_none=True)


class LogEvent(_Record):
    """One log line; the keys are exactly those Docker's fluentd log driver sends."""

    container_id: ContainerIdStr = Field(description="The full 64-hex-digit container id.")
    container_name: ContainerNameStr = Field(
        description="The container name with its leading '/'.", examples=["/web-1"]
    )
    source: Literal["stdout", "stderr"] = Field(description="The stream the line came from.")
    log: str = Field(description="The line, without its trailing newline.")


class StatsEvent(_Record):
    """One Stats API sample, as the figures ``docker stats`` shows."""

    container_id: ContainerIdStr
    container_name: ContainerNameStr
    image: str = Field(description="The image name the container was created from.")
    cpu_percent: float | None = Field(
        default=None,
        description="CPU use over the sampling period, 100 per busy core, computed as the "
        "Docker CLI does. Absent when there is no previous sample to compare against.",
    )
    online_cpus: int | None = Field(default=None, description="CPUs the container may use.")
    memory_usage_bytes: int = Field(description="Memory in use, without the page cache.")
    memory_limit_bytes: int = Field(description="The memory limit (the host's memory if none).")
    memory_percent: float = Field(description="memory_usage_bytes / memory_limit_bytes * 100.")
    network_rx_bytes: int = Field(description="Bytes received, summed over interfaces.")
    network_tx_bytes: int = Field(description="Bytes sent, summed over interfaces.")
    network_rx_packets: int = Field(description="Packets received, summed over interfaces.")
    network_tx_packets: int = Field(description="Packets sent, summed over interfaces.")
    block_read_bytes: int = Field(description="Bytes read from block devices.")
    block_write_bytes: int = Field(description="Bytes written to block devices.")
    pids: int = Field(description="Processes and threads in the container.")


LifecycleAction = Literal[
    "create",
    "start",
    "die",
    "kill",
    "oom",
    "stop",
    "restart",
    "pause",
    "unpause",
    "destroy",
    "health_status",
]


class LifecycleEvent(_Record):
    """One container event from the daemon's ``/events`` stream."""

    action: LifecycleAction = Field(description="What happened to the container.")
    container_id: ContainerIdStr
    container_name: ContainerNameStr
    image: str = Field(description="The image name the container was created from.")
    exit_code: int | None = Field(default=None, description="The exit code, on 'die'.")
    signal: int | None = Field(default=None, description="The signal number, on 'kill'.")
    health_status: str | None = Field(
        default=None, description="'healthy', 'unhealthy' or 'starting', on 'health_status'."
    )


RECORD_MODELS: dict[str, type[_Record]] = {
    "log_event": LogEvent,
    "stats_event": StatsEvent,
    "lifecycle_event": LifecycleEvent,
}
