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
from collections.abc import Callable
from typing import Any, TextIO

from forwarder.buffer import ChunkBuffer
from forwarder.checkpoint import PositionStore, PositionTracker
from forwarder.config import Config
from forwarder.docker.discovery import Discovery
from forwarder.docker.engine import Engine
from forwarder.docker.follower import EngineLogSource
from forwarder.docker.frames import LogLine
from forwarder.events import ContainerId, ContainerInfo, Position
from forwarder.forward.client import ForwardOutput
from forwarder.forward.protocol import (
    Chunk,
    Chunker,
    decode_entries,
    encode_entries,
    encode_log_entries,
)
from forwarder.tags import compile_template

log = logging.getLogger(__name__)

# When no entry arrived for this long, the input has gone quiet: flush at once rather than
# let the last lines of a burst sit out a whole flush_interval. While the engine streams
# a burst, reads follow each other far faster than this.
QUIET_S = 0.02


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
        self.lines_in = 0

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
        entries = encode_log_entries(container.id, container.name, lines)
        self.lines_in += len(lines)
        await self._add(self.log_tag(container), entries, len(lines), (container.cid, position))

    async def add_records(self, tag: str, records: list[tuple[int, dict[str, Any]]]) -> None:
        await self._add(tag, encode_entries(records), len(records), None)

    async def _add(
        self,
        tag: str,
        entries: bytes,
        count: int,
        position: tuple[ContainerId, Position] | None,
    ) -> None:
        sealed = self.chunker.add(tag, entries, count, self._clock(), position)
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
    """Saves committed positions after deliveries, coalescing saves that pile up."""

    def __init__(self, store: PositionStore, tracker: PositionTracker) -> None:
        self.store = store
        self.tracker = tracker
        self._dirty = asyncio.Event()
        self.saves = 0

    def mark(self) -> None:
        self._dirty.set()

    async def save_now(self) -> None:
        self._dirty.clear()
        snapshot = dict(self.tracker.committed)
        await asyncio.to_thread(self.store.save, snapshot, time.time_ns())
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
        committed, last_run_ns = self.store.load()
        self.first_start = last_run_ns is None
        self.tracker = PositionTracker(committed)
        self.buffer = ChunkBuffer(config.output.buffer_limit)
        self.collector = Collector(config, self.buffer, self.tracker)
        self.checkpointer = Checkpointer(self.store, self.tracker)
        self.engine = Engine(config.docker.host)
        self._forget_later: set[ContainerId] = set()
        self.discovery = Discovery(
            config=config,
            engine=self.engine,
            source=EngineLogSource(self.engine),
            sink=self.collector.add_lines,
            positions=dict(committed),
            first_start=self.first_start,
            last_run_ns=last_run_ns,
            on_gone=self._on_gone,
        )
        self.output: ForwardOutput | StdoutOutput
        if config.output.mode == "stdout":
            self.output = StdoutOutput(self.buffer, self._delivered, stdout or sys.stdout)
        else:
            self.output = ForwardOutput(
                config.output,
                get_chunk=self.buffer.get,
                delivered=self._delivered,
                ssl_context=_ssl_context(config),
                handshake_factory=_handshake_factory(config),
            )
        self.chunks_delivered = 0
        self.lines_delivered = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _delivered(self, chunk: Chunk) -> None:
        self.chunks_delivered += 1
        self.lines_delivered += chunk.count
        if self.tracker.delivered(chunk.seq):
            self.checkpointer.mark()
        await self.buffer.done(chunk)
        if self._forget_later:
            self._forget_done()

    def _on_gone(self, cid: ContainerId) -> None:
        self._forget_later.add(cid)
        self.collector.forget(cid)
        self._forget_done()

    def _forget_done(self) -> None:
        for cid in list(self._forget_later):
            if not self.tracker.in_flight(cid):
                self._forget_later.discard(cid)
                self.tracker.forget(cid)
                self.checkpointer.mark()

    async def start(self) -> None:
        self.config.state.dir.mkdir(parents=True, exist_ok=True)
        # Written at once, so that a later start knows this one happened (and when).
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
        """Stop reading, deliver what is held for up to ``timeout_s``; True if all went."""
        deadline = time.monotonic() + timeout_s
        await _cancel(self._discovery_task)
        await _cancel(self._flusher_task)
        delivered_all = False
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.collector.flush()
                await self.buffer.wait_empty()
                delivered_all = True
        except TimeoutError:
            log.warning(
                "shutdown: %d chunks (%d bytes) not delivered within %.1fs; their lines will "
                "be read again from the engine on the next start",
                self.buffer.queued + (1 if getattr(self.output, "in_flight", None) else 0),
                self.buffer.bytes_held,
                timeout_s,
            )
        await _cancel(self._output_task)
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


def _ssl_context(config: Config) -> Any:
    if not any(s.endpoint.scheme == "tls" for s in config.output.servers):
        return None
    from forwarder.forward.tls import client_context

    return client_context(config.output.tls)


def _handshake_factory(config: Config) -> Any:
    out = config.output
    shared_key = out.secret_shared_key()
    if shared_key is None:
        return None
    from forwarder.forward.handshake import ClientHandshake, Credentials

    credentials = Credentials(
        self_hostname=out.self_hostname,
        shared_key=shared_key,
        username=out.username or "",
        password=out.secret_password() or "",
    )
    return lambda: ClientHandshake(credentials)
