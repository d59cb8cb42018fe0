"""What to follow under the kubelet's pods log directory: names and pure decisions.

The kubelet lays out ``<pods_dir>/<namespace>_<pod>_<uid>/<container>/<restart>.log`` (a
container's restart ``N`` writes ``N.log``; rotation renames ``N.log`` to
``N.log.<YYYYmmdd-HHMMSS>`` and gzips older ones to ``.gz``) and links
``<containers_dir>/<pod>_<namespace>_<container>-<container id>.log`` to each ``N.log``.
Namespace and pod names are DNS names (no ``_``), so the names split unambiguously.

One *log* is one restart of one container: ``N.log`` and its rotated files, followed by one
follower, keyed by the container id read from its link. :class:`PodsTable` takes listings
(:class:`Listing`) and followers that ended, and returns actions; :mod:`.source` does them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from forwarder.records import ContainerId

_POD_DIR_RE = re.compile(r"([^_/]+)_([^_/]+)_([^_/]+)")
_LOG_RE = re.compile(r"(0|[1-9][0-9]*)\.log(?:\.([0-9]{8}-[0-9]{6})(\.gz)?)?")
_LINK_RE = re.compile(r"([^_/]+)_([^_/]+)_([^/]+)-([0-9a-f]{64})\.log")


class LogKey(NamedTuple):
    """One restart of one container: ``<pod dir>/<container>/<restart>.log``."""

    pod_dir: str
    container: str
    restart: int

    @property
    def relative(self) -> str:
        """The current file's path under the pods directory."""
        return f"{self.pod_dir}/{self.container}/{self.restart}.log"


class PodLog(NamedTuple):
    """What a log's path says of it (the ``kubernetes`` map of its records)."""

    namespace: str
    pod: str
    pod_uid: str
    container: str
    restart: int
    container_id: ContainerId


def log_key(pod_dir: str, container: str, file_name: str) -> LogKey | None:
    """The log a file of a container directory belongs to (rotated ones included)."""
    if _POD_DIR_RE.fullmatch(pod_dir) is None:
        return None
    m = _LOG_RE.fullmatch(file_name)
    if m is None:
        return None
    return LogKey(pod_dir, container, int(m.group(1)))


def rotation_order(base: str, name: str) -> tuple[int | str, bool] | None:
    """The chain order of ``name`` for the current file ``base`` (``N.log``): rotated files
    by their timestamp (older first), the current file last; ``None`` for other names (the
    kubelet's ``.tmp`` while compressing)."""
    if name == base:
        return 99_999_999_999_999, False
    if not name.startswith(base + "."):
        return None
    m = _ROTATED_RE.fullmatch(name, len(base) + 1)
    if m is None:
        return None
    return int(m.group(1) + m.group(2)), m.group(3) is not None


_ROTATED_RE = re.compile(r"([0-9]{8})-([0-9]{6})(\.gz)?")


def link_target(link_name: str, target: str) -> tuple[LogKey, ContainerId] | None:
    """A ``containers_dir`` link's log and container id, from its name and its target."""
    m = _LINK_RE.fullmatch(link_name)
    if m is None:
        return None
    parts = target.rstrip("/").split("/")
    if len(parts) < 3:
        return None
    key = log_key(parts[-3], parts[-2], parts[-1])
    if key is None:
        return None
    return key, ContainerId(m.group(4))


def pod_log(key: LogKey, container_id: ContainerId) -> PodLog:
    m = _POD_DIR_RE.fullmatch(key.pod_dir)
    assert m is not None
    return PodLog(m.group(1), m.group(2), m.group(3), key.container, key.restart, container_id)


class Listing(NamedTuple):
    """One look at the directories: the logs whose files exist, and the links' ids."""

    logs: frozenset[LogKey]
    ids: Mapping[LogKey, ContainerId]


# ------------------------------------------------------------------------------ actions


class Follow(NamedTuple):
    key: LogKey
    log: PodLog


class Finish(NamedTuple):
    """The container restarted (a later ``N.log`` exists): read its log to the end, stop."""

    key: LogKey


class Forget(NamedTuple):
    """The log's files are gone and it was read: drop its position."""

    container_id: ContainerId


Action = Follow | Finish | Forget


@dataclass
class _Entry:
    log: PodLog
    following: bool = True
    finishing: bool = False


class PodsTable:
    """The decisions of discovery, pure: what to follow, finish and forget."""

    def __init__(self) -> None:
        self._logs: dict[LogKey, _Entry] = {}
        self.waiting_for_id: set[LogKey] = set()
        """Logs whose link (and so container id) is not there yet."""

    def __len__(self) -> int:
        return sum(1 for e in self._logs.values() if e.following)

    def update(self, listing: Listing) -> list[Action]:
        actions: list[Action] = []
        latest: dict[tuple[str, str], int] = {}
        for key in listing.logs:
            place = (key.pod_dir, key.container)
            latest[place] = max(latest.get(place, -1), key.restart)
        self.waiting_for_id = set()
        for key in sorted(listing.logs):
            entry = self._logs.get(key)
            if entry is None:
                cid = listing.ids.get(key)
                if cid is None:
                    self.waiting_for_id.add(key)
                    continue
                entry = self._logs[key] = _Entry(pod_log(key, cid))
                actions.append(Follow(key, entry.log))
            if (
                entry.following
                and not entry.finishing
                and latest[(key.pod_dir, key.container)] > key.restart
            ):
                entry.finishing = True
                actions.append(Finish(key))
        for key in [k for k in self._logs if k not in listing.logs]:
            entry = self._logs[key]
            if not entry.following:  # read, and now gone: nothing of it is left to read
                del self._logs[key]
                actions.append(Forget(entry.log.container_id))
        return actions

    def ended(self, key: LogKey, *, failed: bool, present: bool) -> list[Action]:
        """Its follower ended: ``failed`` (to be followed again by the next update), or
        read through (the chain is gone: ``present`` false, or the container restarted)."""
        entry = self._logs.get(key)
        if entry is None:
            return []
        if failed:
            del self._logs[key]
            return []
        entry.following = False
        if not present:
            del self._logs[key]
            return [Forget(entry.log.container_id)]
        return []

    def following(self) -> Iterable[LogKey]:
        return [k for k, e in self._logs.items() if e.following]
