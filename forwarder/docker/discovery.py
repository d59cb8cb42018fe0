"""Which containers are followed, and when followers start and stop.

The discovery loop owns the table of followers, as Vector's docker_logs source does: it lists
the containers, then follows ``/events`` from the moment it listed, so that nothing falls
between the two. Each follower is its own task and owns only its own state; when it ends,
discovery looks at the container again and decides whether to follow it once more.

When the events stream breaks (engine restart, network blip) discovery reconnects with
``since`` = the last event's time, drops the events it had already seen at that nanosecond,
and lists again, so that followers match reality.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwarder.config import Config, Environment
from forwarder.docker.engine import (
    ContainerGoneError,
    Engine,
    EngineError,
    EngineUnavailableError,
    LogsUnsupportedError,
)
from forwarder.docker.follower import LinesSink, LogSource, follow_container
from forwarder.docker.frames import EngineStreamError
from forwarder.records import ContainerId, ContainerInfo, Position
from forwarder.timefmt import format_duration, format_since, format_time
from forwarder.tuning import EVENTS_REPLAY_NS, source_retry_delays

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


def _log_if_failed(task: asyncio.Task[None]) -> None:
    """A backstop: a task whose own handling failed is logged now, not at garbage collection
    as "Task exception was never retrieved"."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s: ended by an error", task.get_name(), exc_info=exc)


EventHandler = Callable[[dict[str, Any], ContainerInfo | None], Awaitable[None]]


@dataclass
class _Followed:
    container: ContainerInfo
    task: asyncio.Task[None]


@dataclass
class Discovery:
    config: Config
    engine: Engine
    source: LogSource
    sink: LinesSink
    positions: dict[ContainerId, Position]
    """Positions to resume from: committed ones at start, then what each follower read."""
    first_start: bool
    last_run_ns: int | None
    on_event: EventHandler | None = None
    """Called with every fresh container event and what is known of its container."""
    on_container: Callable[[ContainerInfo], None] | None = None
    """Called when a container is followed, and again when a followed one starts again."""
    on_gone: Callable[[ContainerId], None] | None = None
    on_stopped: Callable[[ContainerId], None] | None = None
    """Called on a container's ``die`` and ``destroy`` events."""
    clock_ns: Callable[[], int] = time.time_ns
    retry_delays: Callable[[], Iterator[float]] = source_retry_delays
    """Backoff for the events stream and for each follower (tests wait for nothing)."""
    followers: dict[ContainerId, _Followed] = field(default_factory=dict)
    skipped: set[ContainerId] = field(default_factory=set)
    _known: dict[ContainerId, ContainerInfo] = field(default_factory=dict)
    _self_id: str | None = None
    _last_event_ns: int | None = None
    """The newest event's time (or the first listing's): where a reconnect resumes."""
    _seen: dict[tuple[str, str, int], None] = field(default_factory=dict)
    _started_ns: int = 0
    _restarted: set[ContainerId] = field(default_factory=set)
    environment: Environment = field(default_factory=Environment.read)

    def __post_init__(self) -> None:
        self._self_id = self_container_id() if self.config.docker.exclude_self else None
        if self.environment.self_container_id:
            self._self_id = self.environment.self_container_id

    # --- main loop ------------------------------------------------------------------------

    async def run(self) -> None:
        delays = self.retry_delays()
        failing_since: float | None = None
        last_error = ""  # an unexpected error is logged with its traceback when it is new
        first = True
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
                await asyncio.sleep(next(delays))
        finally:
            await self.stop_followers()

    async def _sync(self, first: bool) -> None:
        """List containers and start followers for those not followed yet.

        A stopped container is read (whole, or from its position) when it finished after the
        horizon: the collector's last run at start-up, or the last event seen before the
        events stream broke; its lines would otherwise never be read."""
        horizon = self.last_run_ns if first else self._last_event_ns
        if self._last_event_ns is None:
            self._last_event_ns = self.clock_ns()
        self._started_ns = self.clock_ns()
        ids = await self.engine.list_container_ids(all=True)
        for cid in ids:
            if cid in self.followers or cid in self.skipped:
                continue
            try:
                container = await self.engine.inspect(cid)
            except ContainerGoneError:
                continue
            self._known[cid] = container
            if not container.running and (horizon is None or container.finished_at_ns <= horizon):
                continue
            self._start(container, at_startup=first)
        if first:
            existing = set(ids)
            for cid in [c for c in self.positions if c not in existing]:
                self._gone(cid)

    async def _watch_events(self) -> None:
        since = self._last_event_ns
        if since is not None and self._seen:
            # A reconnect: an event stamped just before the newest one seen may not have
            # been sent yet when the stream broke.
            since -= EVENTS_REPLAY_NS
        async for event in self.engine.events(since_ns=since):
            if not self._fresh(event):
                continue
            await self._handle(event)

    def _fresh(self, event: dict[str, Any]) -> bool:
        """False for an event already handled, which a reconnect's replay sends again.

        The engine stamps an event before it queues it, so under load its stream is not in
        time order (by up to tens of ms, seen on 20.10): an event older than the newest one
        seen is new all the same. The keys seen in the last 2 * EVENTS_REPLAY_NS are kept.
        """
        ts = int(event.get("timeNano") or 0)
        key = (str(event.get("id") or ""), str(event.get("Action") or ""), ts)
        if key in self._seen:
            return False
        self._seen[key] = None
        if ts > (self._last_event_ns or 0):
            self._last_event_ns = ts
            horizon = ts - 2 * EVENTS_REPLAY_NS
            while (oldest := next(iter(self._seen))) is not key and oldest[2] < horizon:
                del self._seen[oldest]
        return True

    async def _handle(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        cid = ContainerId(str(event.get("id") or ""))
        if not _ID_RE.fullmatch(cid) or cid == self._self_id:
            return
        container = self._known.get(cid) or (
            self.followers[cid].container if cid in self.followers else None
        )
        if action == "start":
            try:
                container = await self.engine.inspect(cid)
            except ContainerGoneError:
                container = None
            # A short-lived container may have exited already: its log is still there (until
            # it is removed), so it is read all the same, without following.
            if container is not None:
                self._known[cid] = container
                if cid in self.followers:
                    # The old follower may be looking at the stopped container right now;
                    # this tells it to carry on with the new run.
                    self._restarted.add(cid)
                    if self.on_container is not None:
                        self.on_container(container)
                elif cid not in self.skipped:
                    self._start(container, at_startup=False)
        elif action == "destroy":
            self._known.pop(cid, None)
            self.skipped.discard(cid)
        if action in ("die", "destroy") and self.on_stopped is not None:
            self.on_stopped(cid)
        if self.on_event is not None:
            await self.on_event(event, container)
        if action == "destroy" and cid not in self.followers:
            self._gone(cid)

    def _gone(self, cid: ContainerId) -> None:
        self.positions.pop(cid, None)
        if self.on_gone is not None:
            self.on_gone(cid)

    # --- followers ------------------------------------------------------------------------

    def _excluded(self, container: ContainerInfo) -> str | None:
        if self._self_id is not None and container.id == self._self_id:
            return "it is forwarder's own container"
        label = self.config.docker.exclude_label
        if label and container.labels.get(label, "").lower() == "true":
            return f"label {label}=true"
        return None

    def _start(self, container: ContainerInfo, *, at_startup: bool) -> None:
        reason = self._excluded(container)
        if reason is not None:
            log.info("container %s: not followed (%s)", container.name, reason)
            self.skipped.add(container.cid)
            return
        cid = container.cid
        position = self.positions.get(cid)
        since: str | None = None
        if (
            position is None
            and at_startup
            and self.first_start
            and container.running
            and self.config.docker.read_from == "tail"
        ):
            since = format_since(self._started_ns)
        self._known[cid] = container
        if self.on_container is not None:
            self.on_container(container)
        task = asyncio.create_task(
            self._follow(container, position, since), name=f"follow {container.name}"
        )
        task.add_done_callback(_log_if_failed)
        self.followers[cid] = _Followed(container, task)
        log.info(
            "container %s (%s): following%s",
            container.name,
            cid[:12],
            f" from {format_time(position.ts_ns)}"
            if position
            else (f" from now ({format_time(self._started_ns)})" if since else ""),
        )

    async def _follow(
        self, container: ContainerInfo, position: Position | None, since: str | None
    ) -> None:
        """Follow one container until it stops for good or is gone.

        This task owns its container's work: whatever breaks the stream (the engine, a
        corrupt frame, an error of ours) is logged here once, with the container, and the
        log is read again from the last position taken, after a backoff."""
        cid = container.cid
        delays = self.retry_delays()
        failures = 0  # unexpected errors in a row: the first is logged with its traceback

        def on_position(pos: Position) -> None:
            self.positions[cid] = pos

        try:
            while True:
                before = self.positions.get(cid, position)
                try:
                    await follow_container(
                        container,
                        self.source,
                        self.sink,
                        position=before,
                        since=since,
                        follow=container.running,
                        max_line_bytes=self.config.docker.max_line_bytes,
                        on_position=on_position,
                    )
                    # The stream ended: the container stopped, or the engine went away.
                    container = await self.engine.inspect(cid)
                    self._known[cid] = container
                    if not container.running and cid not in self._restarted:
                        return
                    self._restarted.discard(cid)
                    since = None
                    continue
                except LogsUnsupportedError as exc:
                    log.warning(
                        "container %s: its log driver %r can't be read through the API; "
                        "skipped (%s)",
                        container.name,
                        container.log_driver,
                        exc,
                    )
                    self.skipped.add(cid)
                    return
                except ContainerGoneError:
                    return
                except EngineError as exc:
                    log.info("container %s: log stream broke (%s); resuming", container.name, exc)
                except EngineStreamError as exc:
                    log.warning(
                        "container %s: corrupt log stream (%s); reading it again from the "
                        "last line taken",
                        container.name,
                        exc,
                    )
                except Exception as exc:
                    failures += 1
                    log.error(
                        "container %s: following its log failed (%s: %s); following it again "
                        "from the last line taken",
                        container.name,
                        type(exc).__name__,
                        exc,
                        exc_info=failures == 1,
                    )
                if self.positions.get(cid, position) != before:
                    # It got somewhere before it broke: a fresh start for the backoff.
                    delays = self.retry_delays()
                    failures = 0
                # Read again whatever the container's state: a stopped one's rest is unread.
                await asyncio.sleep(next(delays))
        finally:
            followed = self.followers.get(cid)
            if followed is not None and followed.task is asyncio.current_task():
                del self.followers[cid]
            if cid not in self._known and cid not in self.skipped:
                self._gone(cid)

    async def stop_followers(self) -> None:
        tasks = [f.task for f in self.followers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.followers.clear()
