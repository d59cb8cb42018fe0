"""Wires the sources to the output and owns every task's lifecycle and the shutdown.

discovery -> followers -> Collector (chunker) -> ChunkBuffer -> output -> delivered
                                                                          |
                     positions file <-- PositionTracker <-----------------+
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from forwarder.buffer import ChunkBuffer, open_store
from forwarder.checkpoint import PositionStore, PositionTracker
from forwarder.chunks import Chunk, Chunker
from forwarder.config import Config
from forwarder.docker.discovery import Discovery
from forwarder.docker.engine import Engine
from forwarder.docker.follower import advance
from forwarder.docker.logsource import EngineLogSource
from forwarder.docker.stats_poller import CgroupPlace, StatsPoller
from forwarder.forward.output import ForwardOutput
from forwarder.forward.protocol import (
    decode_entries,
    encode_entries,
    encode_log_entries,
)
from forwarder.forward.setup import handshake_factory
from forwarder.records import ContainerId, ContainerInfo, LogLine, Position, RecordKind
from forwarder.tags import compile_template
from forwarder.timefmt import format_duration

log = logging.getLogger(__name__)

# When no entry arrived for this long, the input has gone quiet: flush at once rather than
# let the last lines of a burst sit out a whole flush_interval. While the engine streams
# a burst, reads follow each other far faster than this.
QUIET_S = 0.02
# Positions are saved at most this often (each save is two fsyncs); what was delivered since
# the last save is what a crash sends again, on top of the chunks in flight.
SAVE_INTERVAL_S = 0.1


class Collector:
    """The sink every source writes to: entries in, sealed chunks into the buffer."""

    def __init__(self, config: Config, buffer: ChunkBuffer, tracker: PositionTracker) -> None:
        out = config.output
        self.config = config
        self.buffer = buffer
        self.tracker = tracker
        self.chunker = Chunker(
            chunk_limit=out.chunk_limit,
            flush_interval_s=out.flush_interval.total_seconds(),
            require_ack=out.require_ack or out.mode == "stdout",
            compress=out.compress == "gzip",
        )
        self._log_tag = compile_template(config.tags.logs)
        self._tags: dict[ContainerId, str] = {}
        self._added = asyncio.Event()
        self._clock = time.monotonic
        self.records_in: dict[RecordKind, int] = {"log": 0, "stats": 0, "lifecycle": 0}

    def log_tag(self, container: ContainerInfo) -> str:
        tag = self._tags.get(container.cid)
        if tag is None:
            tag = self._tags[container.cid] = self._log_tag(container)
        return tag

    def forget(self, cid: ContainerId) -> None:
        self._tags.pop(cid, None)

    async def add_lines(
        self, container: ContainerInfo, lines: list[LogLine], position: Position
    ) -> None:
        self.records_in["log"] += len(lines)
        tag = self.log_tag(container)
        for part, part_position in self._split(container, lines, position):
            entries = encode_log_entries(container.id, container.name, part)
            await self._add(tag, entries, len(part), (container.cid, part_position), "log")

    def _split(
        self, container: ContainerInfo, lines: list[LogLine], position: Position
    ) -> list[tuple[list[LogLine], Position]]:
        """Cut a batch (one engine read can hold a thousand lines) into parts that fit in a
        chunk, each with the position it reaches. An inner part's count at its last
        nanosecond ignores earlier parts, so it can only be lower: a resume from it repeats
        a line rather than skipping one."""
        limit = self.config.output.chunk_limit
        overhead = 64 + len(container.id) + len(container.name)
        if len(lines) * overhead + sum(len(line.text) for line in lines) <= limit:
            return [(lines, position)]
        parts: list[tuple[list[LogLine], Position]] = []
        start, size = 0, 0
        for index, line in enumerate(lines):
            size += overhead + len(line.text)
            if size > limit and index > start:
                part = lines[start:index]
                part_position = advance(None, part)
                assert part_position is not None
                parts.append((part, part_position))
                start, size = index, overhead + len(line.text)
        parts.append((lines[start:], position))
        return parts

    async def add_stats(self, tag: str, records: list[tuple[int, dict[str, Any]]]) -> None:
        await self.add_records(tag, records, "stats")

    async def add_records(
        self, tag: str, records: list[tuple[int, dict[str, Any]]], kind: RecordKind
    ) -> None:
        self.records_in[kind] += len(records)
        await self._add(tag, encode_entries(records), len(records), None, kind)

    async def _add(
        self,
        tag: str,
        entries: bytes,
        count: int,
        position: tuple[ContainerId, Position] | None,
        kind: RecordKind,
    ) -> None:
        sealed = self.chunker.add(tag, entries, count, self._clock(), position, kind)
        self._added.set()
        await self._put(sealed)

    async def _put(self, chunks: list[Chunk]) -> None:
        # Register every chunk before the first await, so positions commit in sealing order.
        for chunk in chunks:
            self.tracker.sealed(chunk.seq, chunk.positions)
        for chunk in chunks:
            await self.buffer.put(chunk)

    async def flush(self) -> None:
        await self._put(self.chunker.flush_all())

    async def run_flusher(self) -> None:
        """Seal chunks when the input goes quiet, or when one has waited flush_interval."""
        while True:
            await self._added.wait()
            while True:
                self._added.clear()
                deadline = self.chunker.next_deadline()
                if deadline is None:
                    break
                wait = min(QUIET_S, max(0.0, deadline - self._clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._added.wait()
                if not self._added.is_set():
                    await self.flush()  # quiet
                    break
                await self._put(self.chunker.due(self._clock()))


class Checkpointer:
    """Saves committed positions after deliveries: at once after a quiet spell, then at most
    once per ``interval_s``, the deliveries in between coalesced into one save."""

    def __init__(
        self,
        store: PositionStore,
        tracker: PositionTracker,
        engine_seen_ns: Callable[[], int | None],
        *,
        interval_s: float = SAVE_INTERVAL_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.engine_seen_ns = engine_seen_ns
        self.interval_s = interval_s
        self._sleep = sleep
        self._dirty = asyncio.Event()
        self.saves = 0

    def mark(self) -> None:
        self._dirty.set()

    async def save_now(self) -> None:
        self._dirty.clear()
        snapshot = dict(self.tracker.committed)
        seen_ns = self.engine_seen_ns()
        await asyncio.to_thread(self.store.save, snapshot, time.time_ns(), seen_ns)
        self.saves += 1

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            try:
                await self.save_now()
            except OSError as exc:
                log.error("can't save positions to %s: %s", self.store.path, exc)
                await asyncio.sleep(1)
                self._dirty.set()
                continue
            await self._sleep(self.interval_s)


class StdoutOutput:
    """Prints each record as a JSON line: for trying forwarder out and for debugging."""

    def __init__(self, buffer: ChunkBuffer, delivered: Callable[[Chunk], Any], stream: TextIO):
        self.buffer = buffer
        self.delivered = delivered
        self.stream = stream

    async def run(self) -> None:
        import msgpack

        while True:
            chunk = await self.buffer.get()
            tag, entries, options = msgpack.unpackb(chunk.payload, raw=False)
            if options.get("compressed") == "gzip":
                import gzip

                entries = gzip.decompress(entries)
            for time_, record in decode_entries(entries):
                line = {"tag": tag, "time": f"{time_.seconds}.{time_.nanoseconds:09d}"}
                line["record"] = record
                self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.stream.flush()
            await self.delivered(chunk)


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
        self.collector = Collector(config, self.buffer, self.tracker)
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
        if stats_interval_s > 0:
            self.stats = StatsPoller(
                self.engine,
                interval_s=stats_interval_s,
                tag=compile_template(config.tags.stats),
                sink=self.collector.add_stats,
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
            sink=self.collector.add_lines,
            positions=dict(committed),
            first_start=self.first_start,
            last_run_ns=saved.engine_seen_ns,
            on_gone=self._on_gone,
            lifecycle_sink=lambda tag, records: self.collector.add_records(
                tag, records, "lifecycle"
            ),
            on_container=self._on_container,
            on_stopped=self._on_stopped,
            on_listed=self._on_listed,
        )
        self.output: ForwardOutput | StdoutOutput
        if config.output.mode == "stdout":
            self.output = StdoutOutput(self.buffer, self._delivered, stdout or sys.stdout)
        else:
            self.output = ForwardOutput(
                config.output,
                get_chunk=self.buffer.get,
                delivered=self._delivered,
                stalled=self.buffer.stall,
                ssl_context=_ssl_context(config),
                handshake_factory=handshake_factory(config.output),
            )
        self.chunks_delivered = 0
        self.delivered: dict[RecordKind, int] = {"log": 0, "stats": 0, "lifecycle": 0}
        self._tasks: list[asyncio.Task[None]] = []

    def _durable(self, chunk: Chunk) -> None:
        """The chunk is in the disk buffer: a restart replays it, so its positions commit."""
        if self.tracker.delivered(chunk.seq):
            self.checkpointer.mark()

    async def _delivered(self, chunk: Chunk) -> None:
        self.chunks_delivered += 1
        self.delivered[chunk.kind or kind_of_payload(chunk.payload)] += chunk.count
        if self.tracker.delivered(chunk.seq):
            self.checkpointer.mark()
        self.buffer.recovered()
        await self.buffer.done(chunk)
        if self._forget_later:
            self._forget_done()

    def _on_gone(self, cid: ContainerId) -> None:
        self._forget_later.add(cid)
        self.collector.forget(cid)
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
        read, delivered, buffer = self.collector.records_in, self.delivered, self.buffer
        return {
            "tasks": len(asyncio.all_tasks()),
            "followers": len(self.discovery.followers),
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
        self._flusher_task = spawn(self.collector.run_flusher(), name="flusher")
        self._checkpoint_task = spawn(self.checkpointer.run(), name="checkpointer")
        self._discovery_task = spawn(self.discovery.run(), name="discovery")
        self._tasks = [
            self._output_task,
            self._flusher_task,
            self._checkpoint_task,
            self._discovery_task,
        ]

    async def wait(self) -> None:
        """Returns when a task fails (it should not): the exception propagates."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop reading, deliver what is held for up to ``timeout_s``; True if all went.
        Returns early when no server takes chunks and everything left is on disk: waiting
        would put nothing more at safety."""
        deadline = time.monotonic() + timeout_s
        await _cancel(self._discovery_task)
        if self.stats is not None:
            await self.stats.aclose()
        await _cancel(self._flusher_task)
        delivered_all = all_on_disk = False
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.collector.flush()
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


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def kind_of_payload(payload: bytes) -> RecordKind:
    """The kind of a chunk read back from the disk buffer, which keeps no kind: told by its
    first record's keys (the Chunker never mixes kinds in one chunk)."""
    import msgpack

    _tag, entries, options = msgpack.unpackb(payload, raw=False)
    if options.get("compressed") == "gzip":
        import gzip

        entries = gzip.decompress(entries)
    for _time, record in decode_entries(entries):
        if "log" in record:
            return "log"
        return "lifecycle" if "action" in record else "stats"
    return "log"


def _ssl_context(config: Config) -> Any:
    if not any(s.endpoint.scheme == "tls" for s in config.output.servers):
        return None
    from forwarder.forward.tls import client_context

    return client_context(config.output.tls)
