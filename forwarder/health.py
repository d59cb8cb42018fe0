"""Liveness and readiness: pure verdicts on the pipeline's state, with the reasons.

- **Live** (``/healthz``): the event loop answers (the verdict is computed on it) and none
  of the pipeline's own tasks has ended: they run for the process's life, so one that ended
  died unexpectedly. A restart is the cure.
- **Ready** (``/readyz``): the engine answers (the containers are listed and the events
  stream is read) and, with ``require_ack``, a server is up or the disk buffer has room for
  what comes meanwhile. Not ready means "don't count on this node's logs arriving now",
  not "restart me".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forwarder.forward.balance import ServerState

if TYPE_CHECKING:
    from forwarder.pipeline import Pipeline


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.ok else "failing"}
        if self.reasons:
            out["reasons"] = self.reasons
        return out


def liveness(pipeline: Pipeline) -> Verdict:
    reasons = []
    for task in pipeline.tasks():
        if task.done():
            exc = None if task.cancelled() else task.exception()
            how = "cancelled" if task.cancelled() else f"{exc!r}" if exc else "returned"
            reasons.append(f"task {task.get_name()} ended: {how}")
    return Verdict(not reasons, reasons)


def readiness(pipeline: Pipeline) -> Verdict:
    reasons = []
    if pipeline.config.docker.enabled and not pipeline.discovery.events_up:
        reasons.append("docker engine: containers not listed or events stream not up")
    if pipeline.kubernetes is not None and not pipeline.kubernetes.listed:
        reasons.append("kubernetes: the pods directory is not listed yet")
    config = pipeline.config
    servers = getattr(pipeline.output, "servers", None)
    if config.output.require_ack and servers is not None:
        up = [s.name for s in servers if s.health.state is ServerState.UP]
        if not up:
            buffer = pipeline.buffer
            if buffer.store is None:
                reasons.append('no server is up, and [buffer] mode = "memory" keeps no backlog')
            elif buffer.disk_bytes + config.output.chunk_limit > config.buffer.max_bytes:
                reasons.append("no server is up, and the disk buffer is full")
    return Verdict(not reasons, reasons)
