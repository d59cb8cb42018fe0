"""The Kubernetes node source: CRI log files found under the pods directory, followed.

:class:`CriFileSource` is the json-file source's reader (:mod:`forwarder.docker.filesource`
on :class:`~forwarder.tail.FileTailer`) with the CRI format (:class:`.cri.CriParser`) and the
kubelet's rotation names (``N.log``, ``N.log.<YYYYmmdd-HHMMSS>``, ``.gz``): the same
byte-exact positions, gap reports and rotation handling. :class:`KubernetesSource` lists the
pods and containers directories (on a change of the containers directory, seen by inotify,
and every ``poll_interval_s``), lets :class:`.pods.PodsTable` decide, and runs one follower
per log (:func:`~forwarder.docker.follower.follow_container`, whose joiner keeps ``P``
pieces open however short they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.docker.filesource import JsonFileLogSource, _Reader
from forwarder.docker.follower import follow_container
from forwarder.kubernetes.cri import CriParser
from forwarder.kubernetes.metadata import compile_tag, record_maker
from forwarder.kubernetes.pods import (
    Finish,
    Follow,
    Forget,
    Listing,
    LogKey,
    PodLog,
    PodsTable,
    link_target,
    log_key,
    rotation_order,
)
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position
from forwarder.tail import Naming, Watcher, wait_first

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
"""How long a follower that failed waits before it is followed again."""

MappedLinesSink = Callable[
    [ContainerId, str, list[LogLine], Position, Callable[[LogLine], dict[str, Any]]],
    Awaitable[None],
]
"""Where lines go: the container id (the position's key), the tag, the lines, the position
they reach and how a line becomes a record (:meth:`ChunkAssembler.add_mapped_lines`)."""


@dataclass(frozen=True)
class CriNaming:
    """``N.log`` (current), ``N.log.<YYYYmmdd-HHMMSS>`` (older), ``.gz`` (compressed)."""

    base: str

    def order(self, name: str) -> tuple[int | str, bool] | None:
        return rotation_order(self.base, name)


class _CriReader(_Reader):
    format_name = "the CRI log format"

    def new_parser(self, offset: int) -> CriParser:
        return CriParser(offset)


class CriFileSource(JsonFileLogSource):
    """Reads one CRI log chain (``container.log_path`` is its current ``N.log``)."""

    kind = "cri"

    def path_of(self, container: ContainerInfo) -> Path:
        return Path(container.log_path)

    def naming(self, name: str) -> Naming:
        return CriNaming(name)

    def _reader(self, container: ContainerInfo, position: Position | None) -> _Reader:
        return _CriReader(self, container, position)


def list_logs(pods_dir: Path, containers_dir: Path) -> Listing:
    """The logs with files under ``pods_dir`` and the container ids of ``containers_dir``'s
    links (I/O; entries that vanish meanwhile are left out)."""
    logs: set[LogKey] = set()
    for pod in _scan(pods_dir):
        if not pod.is_dir(follow_symlinks=False):
            continue
        for ctr in _scan(Path(pod.path)):
            if not ctr.is_dir(follow_symlinks=False):
                continue
            for f in _scan(Path(ctr.path)):
                key = log_key(pod.name, ctr.name, f.name)
                if key is not None:
                    logs.add(key)
    ids: dict[LogKey, ContainerId] = {}
    for link in _scan(containers_dir):
        try:
            target = os.readlink(link.path)
        except OSError:
            continue
        found = link_target(link.name, target)
        if found is not None:
            ids[found[0]] = found[1]
    return Listing(frozenset(logs), ids)


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


class _Follower:
    __slots__ = ("container", "log", "stopped", "task")

    def __init__(self, log: PodLog, container: ContainerInfo) -> None:
        self.log = log
        self.container = container
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class KubernetesSource:
    """Discovery and followers of the kubelet's CRI logs (see the module docstring)."""

    def __init__(
        self,
        *,
        pods_dir: Path,
        containers_dir: Path,
        tag: str,
        max_line_bytes: int,
        sink: MappedLinesSink,
        positions: dict[ContainerId, Position],
        on_gone: Callable[[ContainerId], None] | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.pods_dir = pods_dir
        self.containers_dir = containers_dir
        self.files = CriFileSource(poll_interval_s=poll_interval_s)
        self.table = PodsTable()
        self.followers: dict[LogKey, _Follower] = {}
        self._tag = compile_tag(tag)
        self._max_line_bytes = max_line_bytes
        self._sink = sink
        self._positions = positions
        self._on_gone = on_gone
        self._poll_interval_s = poll_interval_s
        self._ended: asyncio.Queue[tuple[LogKey, bool]] = asyncio.Queue()
        self._listing = Listing(frozenset(), {})
        self.listed = False
        """The directories were listed at least once (readiness)."""

    async def run(self) -> None:
        watcher = Watcher(self.containers_dir, self._poll_interval_s)
        try:
            while True:
                self._listing = await asyncio.to_thread(
                    list_logs, self.pods_dir, self.containers_dir
                )
                self.listed = True
                self._perform(self.table.update(self._listing))
                await self._wait(watcher)
        finally:
            watcher.close()
            await self._stop_all()

    async def _wait(self, watcher: Watcher) -> None:
        _, ended = await wait_first(watcher.wait(), self._ended.get())
        pending = [ended.result()] if ended.done() and not ended.cancelled() else []
        while not self._ended.empty():
            pending.append(self._ended.get_nowait())
        for key, failed in pending:
            self.followers.pop(key, None)
            present = key in self._listing.logs
            self._perform(self.table.ended(key, failed=failed, present=present))

    def _perform(self, actions: list[Follow | Finish | Forget]) -> None:
        for action in actions:
            if isinstance(action, Follow):
                self._start(action.key, action.log)
            elif isinstance(action, Finish):
                follower = self.followers.get(action.key)
                if follower is not None:
                    follower.stopped.set()
            else:
                self._positions.pop(action.container_id, None)
                if self._on_gone is not None:
                    self._on_gone(action.container_id)

    def _start(self, key: LogKey, pod_log: PodLog) -> None:
        container = ContainerInfo(
            id=pod_log.container_id,
            name=f"/{pod_log.pod}_{pod_log.namespace}_{pod_log.container}",
            log_path=str(self.pods_dir / key.relative),
            running=True,
        )
        follower = _Follower(pod_log, container)
        self.followers[key] = follower
        follower.task = asyncio.create_task(self._follow(key, follower), name=f"cri {key.relative}")

    async def _follow(self, key: LogKey, follower: _Follower) -> None:
        container = follower.container
        cid = container.cid
        tag = self._tag(follower.log)
        record = record_maker(follower.log)

        async def sink(_c: ContainerInfo, lines: list[LogLine], position: Position) -> None:
            await self._sink(cid, tag, lines, position, record)

        def on_position(position: Position) -> None:
            self._positions[cid] = position

        failed = False
        log.info("following %s (container %s)", key.relative, cid[:12])
        try:
            await follow_container(
                container,
                self.files,
                sink,
                position=self._positions.get(cid),
                since=None,
                follow=True,
                max_line_bytes=self._max_line_bytes,
                on_position=on_position,
                stopped=follower.stopped,
                piece_bytes=0,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reading %s failed; it is read again from its position", key.relative)
            failed = True
            await asyncio.sleep(RETRY_AFTER_S)
        self._ended.put_nowait((key, failed))

    async def _stop_all(self) -> None:
        tasks = [f.task for f in self.followers.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.followers.clear()
