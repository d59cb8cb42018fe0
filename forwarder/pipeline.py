"""Wires the sources to the output and owns every task's lifecycle and the shutdown.

discovery -> followers -> ChunkAssembler -> ChunkBuffer -> output -> delivered
                                                                          |
                     positions file <-- PositionTracker <-----------------+
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from forwarder.assembler import ChunkAssembler
from forwarder.buffer import ChunkBuffer, open_store
from forwarder.checkpoint import Checkpointer, PositionStore, PositionTracker
from forwarder.chunks import Chunk, kind_of_payload
from forwarder.config import Config
from forwarder.docker.discovery import Discovery
from forwarder.docker.engine import Engine
from forwarder.docker.filesource import JsonFileLogSource
from forwarder.docker.logsource import EngineLogSource
from forwarder.docker.stats_poller import CgroupPlace, StatsPoller
from forwarder.forward.output import ForwardOutput
from forwarder.forward.setup import handshake_factory
from forwarder.kubernetes.source import KubernetesSource
from forwarder.metadata import needs_host
from forwarder.outputs import Output, StdoutOutput
from forwarder.records import ContainerId, ContainerInfo, Position, RecordKind
from forwarder.tags import compile_template
from forwarder.timefmt import format_duration

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, config: Config, *, stdout: TextIO | None = None) -> None:
        self.config = config
        self.store = PositionStore(config.state.dir)
        saved = self.store.load()
        committed = saved.positions
        self.first_start = saved.first_start
        self.tracker = PositionTracker(committed)
        buffer_cfg = config.buffer
        self.buffer = ChunkBuffer(
            config.output.buffer_limit,
            store=None
            if buffer_cfg.mode == "memory"
            else open_store(config.state.dir, buffer_cfg.max_bytes),
            always_disk=buffer_cfg.mode == "always",
            drop_oldest=buffer_cfg.overflow == "drop_oldest",
            on_durable=self._durable,
        )
        self.assembler = ChunkAssembler(config, self.buffer, self.tracker)
        self.checkpointer = Checkpointer(
            self.store,
            self.tracker,
            # Only a run that reached the engine moves the horizon; one that did not keeps
            # the last one's, so that its successor still catches up (or starts fresh).
            lambda: self.discovery.watched_ns or saved.engine_seen_ns,
        )
        self.engine = Engine(config.docker.host)
        self._forget_later: set[ContainerId] = set()
        stats_interval_s = config.stats.interval.total_seconds()
        self.stats: StatsPoller | None = None
        if stats_interval_s > 0 and config.containers.stats:
            self.stats = StatsPoller(
                self.engine,
                interval_s=stats_interval_s,
                tag=compile_template(config.tags.stats),
                sink=self.assembler.add_stats,
                cgroups=None
                if config.stats.source == "api"
                else CgroupPlace(
                    Path(config.stats.cgroup_root),
                    Path(config.stats.proc_root),
                    self.engine.init_pid,
                    required=config.stats.source == "cgroup",
                ),
            )
        self.discovery = Discovery(
            config=config,
            engine=self.engine,
            source=EngineLogSource(self.engine),
            file_source=None
            if config.docker.log_source == "api"
            else JsonFileLogSource(config.docker.containers_dir),
            sink=self.assembler.add_lines,
            positions=dict(committed),
            first_start=self.first_start,
            last_run_ns=saved.engine_seen_ns,
            on_gone=self._on_gone,
            lifecycle_sink=lambda tag, records: self.assembler.add_records(
                tag, records, "lifecycle"
            ),
            on_container=self._on_container,
            on_stopped=self._on_stopped,
            on_listed=self._on_listed,
            on_engine_name=self.assembler.set_host if needs_host(config.records) else None,
        )
        self.kubernetes: KubernetesSource | None = None
        if config.kubernetes.enabled:
            k8s = config.kubernetes
            self.kubernetes = KubernetesSource(
                pods_dir=Path(k8s.pods_dir),
                containers_dir=Path(k8s.containers_dir),
                tag=config.tags.kubernetes,
                max_line_bytes=k8s.max_line_bytes,
                sink=self.assembler.add_mapped_lines,
                positions=dict(committed),
                on_gone=self._on_gone,
            )
        self.output: Output
        if config.output.mode == "stdout":
            self.output = StdoutOutput(self.buffer, self._delivered, stdout or sys.stdout)
        else:
            self.output = self.forward_output(config)
        self.chunks_delivered = 0
        self.delivered: dict[RecordKind, int] = {"log": 0, "stats": 0, "lifecycle": 0}
        self.delivered_bytes: dict[RecordKind, int] = {"log": 0, "stats": 0, "lifecycle": 0}
        # The newest log record delivered (engine time), and how far behind it was then.
        self.newest_delivered_ns = 0
        self.delivery_lag_s: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tasks_changed = asyncio.Event()

    def _durable(self, chunk: Chunk) -> None:
        """The chunk is in the disk buffer: a restart replays it, so its positions commit."""
        self._commit(chunk)

    def _commit(self, chunk: Chunk) -> None:
        # A chunk recovered from an earlier run (no seq) had its positions committed there.
        if chunk.seq is not None and self.tracker.delivered(chunk.seq):
            self.checkpointer.mark()

    async def _delivered(self, chunk: Chunk) -> None:
        self.chunks_delivered += 1
        kind = chunk.kind or kind_of_payload(chunk.payload)
        self.delivered[kind] += chunk.count
        self.delivered_bytes[kind] += chunk.size
        if chunk.positions:
            newest = max(position.ts_ns for position in chunk.positions.values())
            self.delivery_lag_s = max(0.0, (time.time_ns() - newest) / 1e9)
            self.newest_delivered_ns = max(self.newest_delivered_ns, newest)
        self._commit(chunk)
        self.buffer.recovered()
        await self.buffer.done(chunk)
        if self._forget_later:
            self._forget_done()

    def _on_gone(self, cid: ContainerId) -> None:
        self._forget_later.add(cid)
        self.assembler.forget(cid)
        self._forget_done()

    def _on_listed(self, from_now: dict[ContainerId, Position]) -> None:
        """Saved at once: from here on a start is a restart, and the containers read from
        now on resume where they began, even if none of their lines is delivered yet."""
        for cid, position in from_now.items():
            self.tracker.start_at(cid, position)
        self.checkpointer.mark()

    def _on_container(self, container: ContainerInfo) -> None:
        if self.stats is not None:
            self.stats.start(container)

    def _on_stopped(self, cid: ContainerId) -> None:
        if self.stats is not None:
            self.stats.stop(cid)

    def status(self) -> dict[str, int | None]:
        """Counts for the SIGUSR1 status line (None: not known); the README explains each."""
        read, delivered, buffer = self.assembler.records_in, self.delivered, self.buffer
        by_source = self.discovery.followers_by_source()
        file_source = self.discovery.file_source
        return {
            "tasks": len(asyncio.all_tasks()),
            "followers": len(self.discovery.followers),
            "followers_file": by_source["file"],
            "followers_api": by_source["api"],
            "rotation_gaps": file_source.rotation_gaps if file_source else 0,
            "stats_pollers": len(self.stats) if self.stats is not None else 0,
            "engine_connections": self.engine.open_connections(),
            "log_lines_read": read["log"],
            "stats_records_read": read["stats"],
            "lifecycle_records_read": read["lifecycle"],
            "buffer_chunks": buffer.queued,
            "buffer_bytes": buffer.bytes_held,
            "waiting_puts": buffer.waiting_puts,
            "disk_chunks": buffer.disk_chunks,
            "disk_chunk_bytes": buffer.disk_chunk_bytes,
            "disk_file_bytes": buffer.disk_bytes,
            "dropped_records": buffer.dropped_records,
            "lost_corrupt": buffer.lost_corrupt,
            "chunks_delivered": self.chunks_delivered,
            "log_lines_delivered": delivered["log"],
            "stats_records_delivered": delivered["stats"],
            "lifecycle_records_delivered": delivered["lifecycle"],
        }

    def delivered_summary(self) -> str:
        """What was delivered, for the last log line: "12 log lines, 4 stats records and 1
        lifecycle record in 7 chunks"."""
        log_lines, stats, lifecycle = (self.delivered[k] for k in ("log", "stats", "lifecycle"))
        return (
            f"{_plural(log_lines, 'log line')}, {_plural(stats, 'stats record')} and "
            f"{_plural(lifecycle, 'lifecycle record')} in {_plural(self.chunks_delivered, 'chunk')}"
        )

    def _forget_done(self) -> None:
        for cid in list(self._forget_later):
            if not self.tracker.in_flight(cid):
                self._forget_later.discard(cid)
                self.tracker.forget(cid)
                self.checkpointer.mark()

    async def start(self) -> None:
        self.config.state.dir.mkdir(parents=True, exist_ok=True)
        damage = await self.buffer.open()
        if damage:
            log.warning(
                "disk buffer: skipped %d damaged records (a crash in the middle of a write?); "
                "the records around them are kept: %s",
                len(damage),
                "; ".join(str(d) for d in damage),
            )
        if self.buffer.disk_chunks:
            log.info(
                "disk buffer: %d chunks from the last run, delivered first", self.buffer.disk_chunks
            )
        # Written at once (a run that never reaches the engine leaves what it found).
        await self.checkpointer.save_now()
        spawn = asyncio.create_task
        self._output_task = spawn(self.output.run(), name="output")
        self._flusher_task = spawn(self.assembler.run_flusher(), name="flusher")
        self._checkpoint_task = spawn(self.checkpointer.run(), name="checkpointer")
        self._discovery_task = spawn(
            self.discovery.run() if self.config.docker.enabled else _idle(), name="discovery"
        )
        self._tasks = [
            self._output_task,
            self._flusher_task,
            self._checkpoint_task,
            self._discovery_task,
        ]
        self._kubernetes_task: asyncio.Task[None] | None = None
        if self.kubernetes is not None:
            self._kubernetes_task = spawn(self.kubernetes.run(), name="kubernetes")
            self._tasks.append(self._kubernetes_task)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The tasks that run for the pipeline's life (liveness looks at them)."""
        return list(self._tasks)

    async def wait(self) -> None:
        """Returns when a task fails (it should not): the exception propagates."""
        while True:
            changed = asyncio.ensure_future(self._tasks_changed.wait())
            try:
                done, _ = await asyncio.wait(
                    [*self._tasks, changed], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                changed.cancel()
            self._tasks_changed.clear()
            for task in done:
                # A cancelled one was swapped out (only shutdown and a swap cancel them).
                if task in self._tasks and not task.cancelled():
                    task.result()
                    return

    def forward_output(self, config: Config) -> ForwardOutput:
        """A Forward output for ``config`` on this pipeline's buffer (TLS files read now):
        the one at start, and the one a reload swaps in."""
        return ForwardOutput(
            config.output,
            get_chunk=self.buffer.get,
            delivered=self._delivered,
            stalled=self.buffer.stall,
            ssl_context=_ssl_context(config),
            handshake_factory=handshake_factory(config.output),
        )

    async def swap_output(self, output: ForwardOutput) -> None:
        """Run ``output`` in place of the current one (a reload): the old one is cancelled,
        which hands every chunk it held back to the buffer, oldest first, and the new one
        takes them from there."""
        old = self._output_task
        await _cancel(old)
        self.output = output
        self._output_task = asyncio.create_task(output.run(), name="output")
        self._tasks[self._tasks.index(old)] = self._output_task
        self._tasks_changed.set()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop reading, deliver what is held for up to ``timeout_s``; True if all went.
        Returns early when no server takes chunks and everything left is on disk: waiting
        would put nothing more at safety."""
        deadline = time.monotonic() + timeout_s
        await _cancel(self._discovery_task)
        if self._kubernetes_task is not None:
            await _cancel(self._kubernetes_task)
        if self.stats is not None:
            await self.stats.aclose()
        await _cancel(self._flusher_task)
        delivered_all = all_on_disk = False
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.assembler.flush()
                delivered_all = await self.buffer.wait_safe()
                all_on_disk = not delivered_all
        except TimeoutError:
            pass
        # Cancelled, the output hands the chunks it held back to the buffer.
        await _cancel(self._output_task)
        written = await self.buffer.close()
        if not delivered_all:
            log.warning(
                "shutdown: %s; %s",
                "no server takes chunks and everything left is on disk, so not waiting"
                if all_on_disk
                else f"not all delivered within {format_duration(timeout_s)}",
                f"{self.buffer.disk_chunks + written} chunks kept in the disk buffer for the "
                "next start"
                if self.buffer.store is not None
                else "their lines will be read from the engine again on the next start",
            )
        await _cancel(self._checkpoint_task)
        try:
            await self.checkpointer.save_now()
        except OSError as exc:
            log.error("can't save positions to %s: %s", self.store.path, exc)
        await self.engine.aclose()
        return delivered_all


async def _idle() -> None:
    """In place of Docker discovery when [docker] enabled = false."""
    await asyncio.Event().wait()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ssl_context(config: Config) -> Any:
    if not any(s.endpoint.scheme == "tls" for s in config.output.servers):
        return None
    from forwarder.forward.tls import client_context

    return client_context(config.output.tls)
