"""Discovery's I/O loop: lists containers, reads ``/events``, runs the followers.

It lists the containers, then follows ``/events`` from the moment it listed, so that nothing
falls between the two, as Vector's docker_logs source does. What to do with each listing,
event, inspection and ended follower is decided by :class:`ContainerTable`
(:mod:`forwarder.docker.containers`); this loop only performs the actions it returns. Each
follower is its own task (:func:`forwarder.docker.follower.run_follower`) and hands its state
back when its stream ends.

When the events stream breaks (engine restart, network blip) discovery reconnects with
``since`` = the last event's time, drops the events it had already seen at that nanosecond,
and lists again, so that followers match reality.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.config import Config, Environment
from forwarder.docker.containers import (
    Action,
    ContainerTable,
    EmitLifecycle,
    EndReason,
    Follow,
    FollowerEnded,
    Forget,
    Inspect,
    ReportEnd,
    Skip,
    Unwatch,
    Watch,
)
from forwarder.docker.engine import ContainerGoneError, Engine, EngineUnavailableError
from forwarder.docker.filesource import JsonFileLogSource
from forwarder.docker.follower import LinesSink, run_follower
from forwarder.docker.logsource import LogSource
from forwarder.multiline import MultilineRules
from forwarder.records import ContainerId, ContainerInfo, Position, RecordsSink
from forwarder.selection import Selection
from forwarder.tags import compile_template
from forwarder.timefmt import format_duration, format_time
from forwarder.tuning import source_retry_delays

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[0-9a-f]{64}")


def self_container_id(proc: Path = Path("/proc/self"), hostname: str | None = None) -> str | None:
    """The id of the container this process runs in, if any (cgroup v1, or mountinfo on v2)."""
    for name in ("cgroup", "mountinfo"):
        try:
            text = (proc / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if name == "mountinfo" and "/containers/" not in line:
                continue
            if name == "cgroup" and "docker" not in line and "containerd" not in line:
                continue
            match = _ID_RE.search(line)
            if match:
                return match[0]
    return None


@dataclass
class Discovery:
    config: Config
    engine: Engine
    source: LogSource
    sink: LinesSink
    positions: dict[ContainerId, Position]
    """Positions to resume from: committed ones at start, then what each follower read."""
    first_start: bool
    """No run from this state ever reached the engine: ``read_from`` applies."""
    last_run_ns: int | None
    """Up to when the last run that reached the engine watched it (None: never)."""
    lifecycle_sink: RecordsSink | None = None
    """Gets the lifecycle records of container events, with their tag (``tags.events``)."""
    on_container: Callable[[ContainerInfo], None] | None = None
    """Called when a container is followed, and again when a followed one starts again."""
    on_gone: Callable[[ContainerId], None] | None = None
    on_stopped: Callable[[ContainerId], None] | None = None
    """Called on a container's ``die`` and ``destroy`` events."""
    on_listed: Callable[[dict[ContainerId, Position]], None] | None = None
    """Called after each listing that went through, with the positions it chose for
    containers read from now on (``read_from = "tail"`` on a first start): they are
    where those containers resume, whatever happens next."""
    on_engine_name: Callable[[str], None] | None = None
    """Given the engine's name once it is known (asked only when set)."""
    clock_ns: Callable[[], int] = time.time_ns
    retry_delays: Callable[[], Iterator[float]] = source_retry_delays
    """Backoff for the events stream and for each follower (tests wait for nothing)."""
    environment: Environment = field(default_factory=Environment.read)
    file_source: JsonFileLogSource | None = None
    """Reads json-file logs from disk, for the containers the table says (``log_source``)."""
    followers: dict[ContainerId, asyncio.Task[FollowerEnded]] = field(default_factory=dict)
    follower_sources: dict[ContainerId, str] = field(default_factory=dict)
    """Which source reads each followed container: "file" or "api"."""
    _stopped: dict[ContainerId, asyncio.Event] = field(default_factory=dict)
    table: ContainerTable = field(init=False)
    events_up: bool = False
    """Listed, and reading the events stream (readiness)."""
    reconnects: int = 0
    """Times the listing and events stream were started again after a failure."""
    _stopping: bool = False

    def __post_init__(self) -> None:
        self_id = self_container_id() if self.config.docker.exclude_self else None
        if self.environment.self_container_id:
            self_id = self.environment.self_container_id
        self._events_tag = compile_template(self.config.tags.events)
        self._multiline = MultilineRules.from_config(self.config, time.monotonic)
        self.table = ContainerTable(
            positions=self.positions,
            first_start=self.first_start,
            last_run_ns=self.last_run_ns,
            read_from_tail=self.config.docker.read_from == "tail",
            exclude_label=self.config.docker.exclude_label,
            self_id=self_id,
            retry_delays=self.retry_delays,
            log_source=self.config.docker.log_source if self.file_source else "api",
            engine_local=self.config.docker.host.startswith("unix://"),
            selection=Selection.from_config(self.config.containers),
            lifecycle=self.config.containers.lifecycle,
        )

    @property
    def watched_ns(self) -> int | None:
        """Up to when this run has surely seen every container event: the newest event's
        time (or the first listing's). None until a listing went through."""
        return self.table.last_event_ns if self.table.listed else None

    # --- main loop ------------------------------------------------------------------------

    async def run(self) -> None:
        delays = self.retry_delays()
        failing_since: float | None = None
        last_error = ""  # an unexpected error is logged with its traceback when it is new
        first = True
        self._stopping = False
        try:
            while True:
                try:
                    await self._sync(first)
                    if failing_since is not None:
                        log.info(
                            "docker engine: reachable again after %s",
                            format_duration(round(time.monotonic() - failing_since, 1)),
                        )
                        failing_since = None
                        delays = self.retry_delays()
                    first = False
                    self.events_up = True
                    await self._watch_events()
                    raise EngineUnavailableError("the events stream ended")
                except EngineUnavailableError as exc:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("docker engine: %s; reconnecting with backoff", exc)
                except Exception as exc:
                    # Discovery itself must not die: the followers would go on, but no new
                    # container would ever be followed. It lists and resumes events again.
                    error = f"{type(exc).__name__}: {exc}"
                    log.error(
                        "discovery failed (%s); listing containers again with backoff",
                        error,
                        exc_info=error != last_error,
                    )
                    last_error = error
                self.events_up = False
                self.reconnects += 1
                await asyncio.sleep(next(delays))
        finally:
            await self.stop_followers()

    async def _sync(self, first: bool) -> None:
        """List containers, and follow those the table says to (see ContainerTable)."""
        if self.on_engine_name is not None:
            self.on_engine_name(await self.engine.name())
            self.on_engine_name = None
        now_ns = self.clock_ns()
        ids = await self.engine.list_container_ids(all=True)
        await self._perform(self.table.on_listed(ids, first=first, now_ns=now_ns))
        from_now = self.table.listing_done()
        if self.on_listed is not None:
            self.on_listed(from_now)

    async def _watch_events(self) -> None:
        async for event in self.engine.events(since_ns=self.table.events_since()):
            await self._perform(self.table.on_event(event))

    # --- actions --------------------------------------------------------------------------

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Inspect):
                try:
                    container: ContainerInfo | None = await self.engine.inspect(action.cid)
                except ContainerGoneError:
                    container = None
                readable = self._log_readable(container)
                await self._perform(
                    self.table.on_inspected(
                        action.cid, container, action.event, log_readable=readable
                    )
                )
            elif isinstance(action, EmitLifecycle):
                if self.lifecycle_sink is not None:
                    records = [(action.ts_ns, action.record.record())]
                    await self.lifecycle_sink(self._events_tag(action.container), records)
            else:
                self._perform_now(action)

    def _log_readable(self, container: ContainerInfo | None) -> bool:
        """Whether the container's json-file log can be read from disk (a fact the table
        needs to choose its source), looked at only where it could matter."""
        if container is None or self.file_source is None or self.table.log_source == "api":
            return False
        if container.log_driver != "json-file" or not self.table.engine_local:
            return False
        return self.file_source.readable(container)

    def _perform_now(self, action: Action) -> None:
        """The actions that need no waiting (all those of an ended follower)."""
        if isinstance(action, Follow):
            self._start(action)
        elif isinstance(action, Watch):
            if self.on_container is not None:
                self.on_container(action.container)
        elif isinstance(action, Unwatch):
            stopped = self._stopped.get(action.cid)
            if stopped is not None:
                stopped.set()  # a file follower reads to the end, then ends
            if self.on_stopped is not None:
                self.on_stopped(action.cid)
        elif isinstance(action, Forget):
            if self.on_gone is not None:
                self.on_gone(action.cid)
        elif isinstance(action, Skip):
            log.log(
                logging.ERROR if action.error else logging.INFO,
                "container %s: not followed (%s)",
                action.container.name,
                action.reason,
            )
        elif isinstance(action, ReportEnd):
            _report(action)
        else:
            raise TypeError(f"{action!r} can't be performed without waiting")

    def _start(self, follow: Follow) -> None:
        container = follow.container
        source: LogSource = self.source
        stopped: asyncio.Event | None = None
        if follow.source == "file":
            assert self.file_source is not None
            source = self.file_source
            stopped = self._stopped[container.cid] = asyncio.Event()
        else:
            self._stopped.pop(container.cid, None)
        task = asyncio.create_task(
            run_follower(
                follow,
                engine=self.engine,
                source=source,
                sink=self.sink,
                max_line_bytes=self.config.docker.max_line_bytes,
                stopped=stopped,
                multiline=self._multiline.joiner,
            ),
            name=f"follow {container.name}",
        )
        task.add_done_callback(self._follower_done)
        self.followers[container.cid] = task
        self.follower_sources[container.cid] = follow.source
        if follow.new:
            position = follow.position
            since_ns = follow.since_ns
            if follow.source == "file":
                assert self.file_source is not None
                how = f"file {self.file_source.path_of(container)}"
            else:
                how = "api"
            log.info(
                "container %s (%s): following%s (%s)",
                container.name,
                container.cid[:12],
                f" from now ({format_time(since_ns)})"
                if since_ns is not None
                else (f" from {format_time(position.ts_ns)}" if position else ""),
                how,
                extra={"container": container.name, "container_id": container.cid},
            )

    def followers_by_source(self) -> dict[str, int]:
        """How many followers each source runs now."""
        counts = {"file": 0, "api": 0}
        for cid in self.followers:
            counts[self.follower_sources.get(cid, "api")] += 1
        return counts

    def _follower_done(self, task: asyncio.Task[FollowerEnded]) -> None:
        """A follower's stream ended: the table decides what follows."""
        if task.cancelled() or self._stopping:
            return
        if (exc := task.exception()) is not None:
            # A backstop: run_follower returns every way a stream ends.
            log.error("%s: ended by an error", task.get_name(), exc_info=exc)
            return
        ended = task.result()
        if self.followers.get(ended.cid) is task:
            del self.followers[ended.cid]
            self.follower_sources.pop(ended.cid, None)
            self._stopped.pop(ended.cid, None)
        try:
            for action in self.table.on_follower_ended(ended):
                self._perform_now(action)
        except Exception:
            log.exception("container %s: deciding after its follower ended failed", ended.cid)

    async def stop_followers(self) -> None:
        self._stopping = True
        tasks = list(self.followers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.followers.clear()


def _report(report: ReportEnd) -> None:
    name = report.container.name
    exc = report.error
    fields = {"container": name, "container_id": report.container.cid, "reason": str(exc)}
    if report.reason is EndReason.UNSUPPORTED:
        log.warning(
            "container %s: its log driver %r can't be read through the API; skipped (%s)",
            name,
            report.container.log_driver,
            exc,
            extra=fields,
        )
    elif report.reason is EndReason.BROKE:
        log.info("container %s: log stream broke (%s); resuming", name, exc)
    elif report.reason is EndReason.CORRUPT:
        log.warning(
            "container %s: corrupt log stream (%s); reading it again from the last line taken",
            name,
            exc,
            extra=fields,
        )
    elif report.reason is EndReason.FAILED:
        log.error(
            "container %s: following its log failed (%s: %s); following it again from the "
            "last line taken",
            name,
            type(exc).__name__,
            exc,
            exc_info=exc if report.traceback else None,
            extra=fields,
        )
