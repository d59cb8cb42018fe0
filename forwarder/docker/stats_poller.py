"""Stats records for the followed containers: one task per running container.

How a task gets its samples depends on ``[stats] interval`` (measured by a colleague with
``bench/bench_stats_modes.py``, 20 containers, 30 s: a held ``stream=1`` request costs the
engine about the same at any interval; a ``stream=0`` poll takes about 2 s, since the engine
waits one collection interval to fill ``precpu_stats``; ``stream=0&one-shot=1`` is the
cheapest at 10 s):

- ``ONESHOT`` (interval >= 2 s): a ``stream=0&one-shot=1`` request per interval; CPU is
  computed against the task's previous sample (:class:`StatsSampler`), so the first record
  has no ``cpu_percent``.
- ``STREAM`` (interval < 2 s): one ``stream=1`` request held open; the engine sends a sample
  a second, and every Nth is shipped (N = interval / 1 s, rounded, at least 1).

With ``[stats] source = "auto"`` or ``"cgroup"`` a task first looks for the container's
cgroup files (:mod:`forwarder.docker.cgroup`, one inspect for the init pid); where it finds
them it reads them each interval instead of asking the engine (the same sample shape, so the
same figures), and falls back to the modes above where it does not.

A task ends when the container stops (a sample without a reading) or is gone (404), and when
discovery says so (:meth:`StatsPoller.stop`). Engine errors are retried with backoff; so is
an unexpected error, which is logged first, with its container.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from forwarder.docker.cgroup import CgroupFiles, CgroupUnavailableError, locate
from forwarder.docker.engine import ContainerGoneError, EngineError
from forwarder.docker.stats import StatsSampleError, StatsSampler, read_time
from forwarder.records import ContainerId, ContainerInfo, RecordsSink
from forwarder.tags import Template
from forwarder.tuning import source_retry_delays

__all__ = ["ENGINE_PERIOD_S", "ONESHOT_FROM_S", "StatsMode", "StatsPoller", "stream_every"]

log = logging.getLogger(__name__)

ONESHOT_FROM_S = 2.0
"""Intervals from this one up are polled one-shot; shorter ones are streamed."""
ENGINE_PERIOD_S = 1.0
"""The engine's stats collection period: a ``stream=1`` response has a sample a second."""

SHIP_GRACE_S = 1.0
"""How long :meth:`StatsPoller.aclose` waits for records still on their way to the buffer."""


class StatsSource(Protocol):
    """What the poller needs of :class:`forwarder.docker.engine.Engine`."""

    def stats_stream(self, cid: str, *, stream: bool = True) -> AsyncIterator[dict[str, Any]]: ...

    async def stats_once(self, cid: str) -> dict[str, Any]: ...


class CgroupPlace:
    """Where :class:`StatsPoller` looks for cgroup files (``[stats] cgroup_root``, ``proc_root``)
    and how it learns a container's init pid (:meth:`Engine.init_pid`); ``required``
    (``source = "cgroup"``) makes a container it can't read that way a warning."""

    def __init__(
        self,
        cgroup_root: Path,
        proc_root: Path,
        init_pid: Callable[[str], Awaitable[int]],
        *,
        required: bool = False,
    ) -> None:
        self.cgroup_root = cgroup_root
        self.proc_root = proc_root
        self.init_pid = init_pid
        self.required = required

    def locate(self, pid: int) -> CgroupFiles:
        return locate(pid, cgroup_root=self.cgroup_root, proc_root=self.proc_root)


class StatsMode(enum.Enum):
    STREAM = "stream"
    ONESHOT = "oneshot"

    @classmethod
    def for_interval(cls, interval_s: float) -> StatsMode:
        return cls.ONESHOT if interval_s >= ONESHOT_FROM_S else cls.STREAM


def stream_every(interval_s: float) -> int:
    """Ship every Nth sample of a stream: the engine sends one each ENGINE_PERIOD_S."""
    return max(1, round(interval_s / ENGINE_PERIOD_S))


class _Stopped(Exception):
    """The container is not running (any more): its task ends."""


class StatsPoller:
    """Owns the stats tasks, one per running followed container; :meth:`aclose` ends them."""

    def __init__(
        self,
        engine: StatsSource,
        *,
        interval_s: float,
        tag: Template,
        sink: RecordsSink,
        clock_ns: Callable[[], int] = time.time_ns,
        retry_delays: Callable[[], Iterator[float]] = source_retry_delays,
        cgroups: CgroupPlace | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("the stats interval must be positive (0 turns stats off)")
        self.engine = engine
        self.interval_s = interval_s
        self.mode = StatsMode.for_interval(interval_s)
        self.tag = tag
        self.sink = sink
        self.clock_ns = clock_ns
        self.retry_delays = retry_delays
        self.cgroups = cgroups
        self.from_files = 0  # tasks reading cgroup files now
        self.tasks: dict[ContainerId, asyncio.Task[None]] = {}
        # Deliveries that a stop() interrupted: they run to the end, so that no chunk the
        # chunker sealed is lost half-way into the buffer (see _ship).
        self._shipping: set[asyncio.Task[None]] = set()
        self.records_out = 0

    def __repr__(self) -> str:
        return f"<StatsPoller {self.mode.value} every {self.interval_s:g}s tasks={len(self)}>"

    def __len__(self) -> int:
        return len(self.tasks)

    def start(self, container: ContainerInfo) -> None:
        """Sample ``container`` from now on, unless it is not running or already sampled."""
        cid = container.cid
        if not container.running or cid in self.tasks:
            return
        task = asyncio.create_task(self._run(container), name=f"stats {container.name}")
        task.add_done_callback(_log_if_failed)
        self.tasks[cid] = task

    def stop(self, cid: ContainerId) -> None:
        """Stop sampling ``cid`` (it stopped, or is gone); the task ends at its next await."""
        task = self.tasks.pop(cid, None)
        if task is not None:
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every task and wait until all have ended."""
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._shipping:
            # A delivery into a full buffer may wait for the output; shutdown goes on
            # after a moment, and the buffer's own close deals with what is left.
            await asyncio.wait(self._shipping, timeout=SHIP_GRACE_S)

    async def _run(self, container: ContainerInfo) -> None:
        cid = container.cid
        sampler = StatsSampler(container)
        tag = self.tag(container)
        delays = self.retry_delays()
        last_error = ""  # an unexpected error is logged with its traceback when it is new
        try:
            while True:
                try:
                    files = await self._locate(container)
                    if files is not None:
                        await self._poll_files(sampler, tag, files)
                    elif self.mode is StatsMode.STREAM:
                        await self._stream(sampler, tag)
                    else:
                        await self._poll(sampler, tag)
                except (_Stopped, ContainerGoneError):
                    return
                except EngineError as exc:
                    log.debug("container %s: stats: %s; retrying", container.name, exc)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.error(
                        "container %s: stats failed (%s); sampling again with backoff",
                        container.name,
                        error,
                        exc_info=error != last_error,
                    )
                    last_error = error
                # A break, or a stream that ended without a last sample: look again.
                await asyncio.sleep(next(delays))
        finally:
            if self.tasks.get(cid) is asyncio.current_task():
                del self.tasks[cid]

    async def _locate(self, container: ContainerInfo) -> CgroupFiles | None:
        """The container's cgroup files, or ``None`` (not configured, not readable here)."""
        if self.cgroups is None:
            return None
        pid = await self.cgroups.init_pid(container.id)
        if pid <= 0:
            raise _Stopped
        try:
            return self.cgroups.locate(pid)
        except CgroupUnavailableError as exc:
            level = logging.WARNING if self.cgroups.required else logging.DEBUG
            log.log(level, "container %s: stats through the API: %s", container.name, exc)
            return None

    async def _poll_files(self, sampler: StatsSampler, tag: str, files: CgroupFiles) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        self.from_files += 1
        try:
            while True:
                try:
                    sample = files.sample(read_ns=self.clock_ns())
                except CgroupUnavailableError as exc:
                    raise _Stopped from exc  # the cgroup goes with the container
                await self._take(sampler, tag, sample, ship=True)
                next_at = max(next_at + self.interval_s, loop.time())
                await asyncio.sleep(next_at - loop.time())
        finally:
            self.from_files -= 1

    async def _poll(self, sampler: StatsSampler, tag: str) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            sample = await self.engine.stats_once(sampler.container.id)
            await self._take(sampler, tag, sample, ship=True)
            # A fixed schedule: the time a request takes does not add up into drift.
            next_at = max(next_at + self.interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())

    async def _stream(self, sampler: StatsSampler, tag: str) -> None:
        every = stream_every(self.interval_s)
        seen = 0
        async for sample in self.engine.stats_stream(sampler.container.id, stream=True):
            await self._take(sampler, tag, sample, ship=seen % every == 0)
            seen += 1

    async def _take(
        self, sampler: StatsSampler, tag: str, sample: dict[str, Any], *, ship: bool
    ) -> None:
        """Feed ``sample`` to the sampler and, if ``ship``, hand its record to the sink.

        Raises :class:`_Stopped` for a stopped container's sample (Go's zero ``read``)."""
        try:
            when = read_time(sample)
            if when is None and "read" in sample:
                raise _Stopped
            event = sampler.feed(sample)
        except StatsSampleError as exc:
            log.warning("container %s: skipped a stats sample: %s", sampler.container.name, exc)
            return
        if not ship:
            return
        ts_ns = when.ns if when is not None else self.clock_ns()
        delivery = asyncio.ensure_future(self.sink(tag, [(ts_ns, event.record())]))
        try:
            # Shielded: a put into a full buffer cancelled half-way would lose a sealed
            # chunk, which may carry other containers' lines too.
            await asyncio.shield(delivery)
        except asyncio.CancelledError:
            if not delivery.done():
                self._shipping.add(delivery)
                delivery.add_done_callback(self._shipping.discard)
                if isinstance(delivery, asyncio.Task):
                    delivery.set_name(f"stats {sampler.container.name}: a record's delivery")
                delivery.add_done_callback(_log_if_failed)
            raise
        self.records_out += 1


def _log_if_failed(task: asyncio.Future[None]) -> None:
    """A backstop: a task that still ends by an exception is logged now, not at garbage
    collection as "Task exception was never retrieved"."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        name = task.get_name() if isinstance(task, asyncio.Task) else "stats"
        log.error("%s: ended by an error", name, exc_info=exc)
