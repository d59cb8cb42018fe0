"""Which containers are followed: the decision table of discovery (sans-I/O).

:class:`ContainerTable` takes what discovery saw (a listing, an event of ``/events``, what
inspecting a container said, a follower whose stream ended) and returns the actions to take;
:mod:`forwarder.docker.discovery` performs them and decides nothing. As in Vector's
docker_logs source, a follower only hands its state back when its stream ends
(:class:`FollowerEnded`: how far it read, why it ended) and the table alone decides whether to
follow the container again: when it runs, or when it was started again meanwhile
(``restart = running or generation < current``).

The rules, in one place:

- **Listing** (at start-up and after the events stream broke): a container not followed yet
  is inspected; a running one is followed, and a stopped one too when it finished after the
  horizon (the last run at start-up, else the last event seen), since its last lines would
  otherwise never be read. At start-up, positions of containers that no longer exist go.
- **Excluded** containers (forwarder's own, labelled ``exclude_label=true``, or refused by
  ``[containers]`` include/exclude, :mod:`forwarder.selection`) are never followed, and their
  events are not shipped as lifecycle records.
- **Events**: ``start`` of a container not followed follows it (a short-lived one that
  already exited is read all the same); of a followed one, it starts a new *generation*, so
  that its follower carries on even if it sees the container stopped. ``die`` and
  ``destroy`` stop its stats; ``destroy`` forgets it once no follower reads it.
- **Which source reads it** (:func:`choose_source`), once, when it is first followed: with
  ``log_source = "auto"``, the json-file log on disk when the driver is json-file, the engine
  local and the file readable; else the API. With ``"file"``, a container that can't be read
  from disk is skipped (an error), never read through the API instead.
- **A follower ended**: stopped (the stream ended, and inspecting said how the container is)
  -> again when running or restarted meanwhile; gone -> forgotten once destroyed; a log driver
  the API can't read -> skipped for good; a broken or corrupt stream or an error of ours ->
  reported once and followed again from its last position after a backoff, which starts
  afresh once the follower got somewhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from forwarder.docker.lifecycle import event_container, lifecycle_record
from forwarder.records import ContainerId, ContainerInfo, LifecycleEvent, Position
from forwarder.selection import Selection
from forwarder.tuning import EVENTS_REPLAY_NS, source_retry_delays

__all__ = [
    "Action",
    "ContainerTable",
    "EmitLifecycle",
    "EndReason",
    "Follow",
    "FollowerEnded",
    "Forget",
    "Inspect",
    "ReportEnd",
    "Skip",
    "Unwatch",
    "Watch",
    "choose_source",
]

SourceKind = Literal["file", "api"]
LogSourceMode = Literal["auto", "file", "api"]

_ID_RE = re.compile(r"[0-9a-f]{64}")


# --- what a follower hands back -------------------------------------------------------------


class EndReason(enum.Enum):
    STOPPED = "stopped"
    """The stream ended (the container stopped, or the engine went away); ``container`` says
    how inspecting it found it afterwards."""
    GONE = "gone"
    """The container no longer exists."""
    UNSUPPORTED = "unsupported"
    """Its log driver can't be read through the API."""
    BROKE = "broke"
    """The engine broke the stream (transient)."""
    CORRUPT = "corrupt"
    """The engine sent bytes that can't be parsed."""
    FAILED = "failed"
    """An error of ours."""


@dataclass(frozen=True)
class FollowerEnded:
    cid: ContainerId
    generation: int
    """The generation the follower was started with."""
    reason: EndReason
    position: Position | None
    """How far it read (the position it was started from when it read nothing)."""
    container: ContainerInfo | None = None
    """STOPPED: the container as inspected after the stream ended."""
    error: BaseException | None = None


# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inspect:
    """Inspect ``cid`` and hand the result to :meth:`ContainerTable.on_inspected`."""

    cid: ContainerId
    event: Mapping[str, Any] | None = None
    """The ``start`` event that asks for it; None for a listed container."""


@dataclass(frozen=True)
class Follow:
    """Start a follower for ``container``: from ``position``, else from ``since_ns``, else the
    whole log; following (``follow=1``) while the container runs; after ``delay_s``."""

    container: ContainerInfo
    generation: int
    position: Position | None
    since_ns: int | None = None
    delay_s: float = 0.0
    new: bool = True
    """A container not followed before (the log says so), not a follower started again."""
    source: SourceKind = "api"
    """Which log source reads it: its json-file log on disk, or the Engine API."""


@dataclass(frozen=True)
class Skip:
    """``container`` is not followed (the log says why)."""

    container: ContainerInfo
    reason: str
    error: bool = False
    """It should have been followed (``log_source = "file"`` and its file can't be read)."""


@dataclass(frozen=True)
class Watch:
    """``container`` is followed, or started again: its stats are sampled."""

    container: ContainerInfo


@dataclass(frozen=True)
class Unwatch:
    """``cid`` died or was destroyed: its stats stop."""

    cid: ContainerId


@dataclass(frozen=True)
class Forget:
    """``cid`` is gone for good: its position goes."""

    cid: ContainerId


@dataclass(frozen=True)
class EmitLifecycle:
    container: ContainerInfo
    ts_ns: int
    record: LifecycleEvent


@dataclass(frozen=True)
class ReportEnd:
    """Log why ``container``'s follower ended (a stream that broke, failed or can't be read);
    ``traceback``: the first of a run of errors of ours is logged with its traceback."""

    container: ContainerInfo
    reason: EndReason
    error: BaseException | None
    traceback: bool = False


Action = Inspect | Follow | Skip | Watch | Unwatch | Forget | EmitLifecycle | ReportEnd


# --- the source of a container's log --------------------------------------------------------


def choose_source(
    container: ContainerInfo, mode: LogSourceMode, *, local: bool, readable: bool
) -> tuple[SourceKind | None, str]:
    """Which source reads ``container``, and why not from disk (``""`` when it is).

    ``local``: the engine runs on this host (a ``unix://`` socket); ``readable``: its json-file
    log (``LogPath``, mapped under ``containers_dir``) can be opened. ``None``: it can't be read
    (``mode = "file"`` and the file can't be)."""
    if mode == "api":
        return "api", 'log_source = "api"'
    if container.log_driver != "json-file":
        why = f"its log driver is {container.log_driver or 'unknown'!r}, not json-file"
    elif not local:
        why = "the engine is not local"
    elif not container.log_path:
        why = "the engine reports no LogPath"
    elif not readable:
        why = f"its log file {container.log_path} can't be read"
    else:
        return "file", ""
    return (None if mode == "file" else "api"), why


# --- the table ------------------------------------------------------------------------------


@dataclass
class _Following:
    container: ContainerInfo
    """The container as this follower last saw it (started with, or inspected at its end)."""
    generation: int
    since_ns: int | None
    delays: Iterator[float]
    source: SourceKind = "api"
    failures: int = 0
    """Errors of ours in a row: the first is logged with its traceback."""


@dataclass
class ContainerTable:
    positions: dict[ContainerId, Position]
    """Where each container's log resumes: committed ones at start, then what followers read."""
    first_start: bool
    """No run from this state ever reached the engine: ``read_from`` applies to the
    containers running now."""
    last_run_ns: int | None
    """Up to when the last run that reached the engine watched it (None: never)."""
    read_from_tail: bool
    exclude_label: str
    self_id: str | None
    retry_delays: Callable[[], Iterator[float]] = source_retry_delays
    log_source: LogSourceMode = "api"
    engine_local: bool = True
    """The engine runs on this host: its json-file logs can be on this host's disk."""
    selection: Selection = field(default_factory=Selection)
    """``[containers]`` include/exclude (:mod:`forwarder.selection`)."""
    lifecycle: bool = True
    """Lifecycle records for the followed containers (``containers.lifecycle``)."""
    following: dict[ContainerId, _Following] = field(default_factory=dict)
    skipped: set[ContainerId] = field(default_factory=set)
    known: dict[ContainerId, ContainerInfo] = field(default_factory=dict)
    """Containers inspected and not destroyed since."""
    last_event_ns: int | None = None
    """The newest event's time (or the first listing's): where a reconnect resumes."""
    listed: bool = False
    """A listing went through in this run: it has seen the engine."""
    _from_now: dict[ContainerId, Position] = field(default_factory=dict)
    _readable: dict[ContainerId, bool] = field(default_factory=dict)
    _seen: dict[tuple[str, str, int], None] = field(default_factory=dict)
    _horizon: int | None = None
    _at_startup: bool = False
    _listed_ns: int = 0

    # --- exclusion ----------------------------------------------------------------------

    def excluded(self, container: ContainerInfo) -> str | None:
        """Why ``container`` is not followed nor reported, or None."""
        if self.self_id is not None and container.id == self.self_id:
            return "it is forwarder's own container"
        label = self.exclude_label
        if label and container.labels.get(label, "").lower() == "true":
            return f"label {label}=true"
        return self.selection.refused(container)

    # --- listing ------------------------------------------------------------------------

    def on_listed(self, ids: list[ContainerId], *, first: bool, now_ns: int) -> list[Action]:
        """The containers listed (all of them, stopped too), at ``now_ns``."""
        self._horizon = self.last_run_ns if first else self.last_event_ns
        if self.last_event_ns is None:
            self.last_event_ns = now_ns
        self._listed_ns = now_ns
        self._at_startup = first
        actions: list[Action] = [
            Inspect(cid) for cid in ids if cid not in self.following and cid not in self.skipped
        ]
        if first:
            existing = set(ids)
            actions += [self._forget(cid) for cid in list(self.positions) if cid not in existing]
        return actions

    def listing_done(self) -> dict[ContainerId, Position]:
        """The listing and what it asked for went through: returns the positions it chose
        for containers read from now on, which the caller commits at once."""
        self.listed = True
        from_now, self._from_now = self._from_now, {}
        return from_now

    def on_inspected(
        self,
        cid: ContainerId,
        container: ContainerInfo | None,
        event: Mapping[str, Any] | None = None,
        *,
        log_readable: bool = False,
    ) -> list[Action]:
        """What inspecting ``cid`` said (None: it is gone), for a listing or a start event;
        ``log_readable``: its json-file log can be opened (see :func:`choose_source`)."""
        self._readable[cid] = log_readable
        if event is not None:
            return self._on_start(cid, container, event)
        if container is None:
            return []
        self.known[cid] = container
        horizon = self._horizon
        if not container.running and (horizon is None or container.finished_at_ns <= horizon):
            return []
        return self.follow(container, at_startup=self._at_startup)

    def follow(self, container: ContainerInfo, *, at_startup: bool = False) -> list[Action]:
        """Follow ``container`` (not followed now), unless it is excluded."""
        reason = self.excluded(container)
        if reason is not None:
            self.skipped.add(container.cid)
            return [Skip(container, reason)]
        cid = container.cid
        source, why = choose_source(
            container,
            self.log_source,
            local=self.engine_local,
            readable=self._readable.get(cid, False),
        )
        if source is None:
            self.skipped.add(cid)
            return [Skip(container, f'log_source = "file" and {why}', error=True)]
        position = self.positions.get(cid)
        since_ns = None
        if (
            position is None
            and at_startup
            and self.first_start
            and container.running
            and self.read_from_tail
        ):
            # From now on: a position like any other, so that a follower that starts over,
            # and the next run, resume here rather than at the head of the log.
            since_ns = self._listed_ns
            position = self.positions[cid] = self._from_now[cid] = Position(since_ns, 0)
        self.known[cid] = container
        self.following[cid] = _Following(container, 0, since_ns, self.retry_delays(), source)
        return [Watch(container), Follow(container, 0, position, since_ns, source=source)]

    # --- events -------------------------------------------------------------------------

    def events_since(self) -> int | None:
        """Where the events stream (re)starts: a reconnect asks again a little before the
        newest event seen, since one stamped just before it may not have been sent yet."""
        since = self.last_event_ns
        if since is not None and self._seen:
            since -= EVENTS_REPLAY_NS
        return since

    def on_event(self, event: Mapping[str, Any]) -> list[Action]:
        """One event of ``/events``; a ``start`` asks for the container to be inspected (and
        is reported from its attributes if it is gone by then)."""
        if not self._fresh(event):
            return []
        cid = ContainerId(str(event.get("id") or ""))
        if not _ID_RE.fullmatch(cid) or cid == self.self_id:
            return []
        if _action(event) == "start":
            return [Inspect(cid, event)]
        return self._after_event(cid, event, self._container(cid))

    def _fresh(self, event: Mapping[str, Any]) -> bool:
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
        if ts > (self.last_event_ns or 0):
            self.last_event_ns = ts
            horizon = ts - 2 * EVENTS_REPLAY_NS
            while (oldest := next(iter(self._seen))) is not key and oldest[2] < horizon:
                del self._seen[oldest]
        return True

    def _container(self, cid: ContainerId) -> ContainerInfo | None:
        following = self.following.get(cid)
        return self.known.get(cid) or (following.container if following else None)

    def _on_start(
        self, cid: ContainerId, container: ContainerInfo | None, event: Mapping[str, Any]
    ) -> list[Action]:
        actions: list[Action] = []
        if container is not None:
            # A short-lived container may have exited already: its log is still there (until
            # it is removed), so it is read all the same, without following.
            self.known[cid] = container
            following = self.following.get(cid)
            if following is not None:
                # Its follower may be looking at the stopped container right now: a new
                # generation tells the table to carry on with the new run when it ends.
                following.generation += 1
                actions.append(Watch(container))
            elif cid not in self.skipped:
                actions += self.follow(container)
        return actions + self._after_event(cid, event, container)

    def _after_event(
        self, cid: ContainerId, event: Mapping[str, Any], container: ContainerInfo | None
    ) -> list[Action]:
        action = _action(event)
        actions: list[Action] = []
        if action == "destroy":
            self.known.pop(cid, None)
            self.skipped.discard(cid)
            self._readable.pop(cid, None)
        if action in ("die", "destroy"):
            actions.append(Unwatch(cid))
        info = event_container(event, container)
        if info is not None and self.lifecycle and self.excluded(info) is None:
            entry = lifecycle_record(event, info)
            if entry is not None:
                actions.append(EmitLifecycle(info, *entry))
        if action == "destroy" and cid not in self.following:
            actions.append(self._forget(cid))
        return actions

    # --- followers ----------------------------------------------------------------------

    def on_follower_ended(self, ended: FollowerEnded) -> list[Action]:
        """A follower's stream ended: follow the container again, or let it go."""
        cid = ended.cid
        following = self.following.get(cid)
        if following is None:
            return []
        before = self.positions.get(cid)
        if ended.position is not None:
            self.positions[cid] = ended.position
        reason = ended.reason
        if reason is EndReason.STOPPED:
            container = ended.container
            assert container is not None
            self.known[cid] = container
            following.container = container
            if container.running or ended.generation < following.generation:
                # Runs, or ran again meanwhile: the new run is read (no backoff: not a failure).
                return [
                    Follow(
                        container,
                        following.generation,
                        self.positions.get(cid),
                        new=False,
                        source=following.source,
                    )
                ]
            return self._ended(cid)
        if reason is EndReason.GONE:
            return self._ended(cid)
        if reason is EndReason.UNSUPPORTED:
            self.skipped.add(cid)
            return [ReportEnd(following.container, reason, ended.error), *self._ended(cid)]
        # Broken, corrupt, or an error of ours: read again from the last position, after a
        # backoff, whatever the container's state (a stopped one's rest is unread).
        traceback = False
        if reason is EndReason.FAILED:
            following.failures += 1
            traceback = following.failures == 1
        report = ReportEnd(following.container, reason, ended.error, traceback)
        if self.positions.get(cid) != before:
            # It got somewhere before it broke: a fresh start for the backoff.
            following.delays = self.retry_delays()
            following.failures = 0
        restart = Follow(
            following.container,
            ended.generation,
            self.positions.get(cid),
            following.since_ns,
            delay_s=next(following.delays),
            new=False,
            source=following.source,
        )
        return [report, restart]

    def _ended(self, cid: ContainerId) -> list[Action]:
        del self.following[cid]
        if cid not in self.known and cid not in self.skipped:
            return [self._forget(cid)]
        return []

    def _forget(self, cid: ContainerId) -> Forget:
        self.positions.pop(cid, None)
        return Forget(cid)


def _action(event: Mapping[str, Any]) -> str:
    return str(event.get("Action") or event.get("status") or "")
