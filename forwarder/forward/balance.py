"""Which server gets the next chunk: server health with backoff, smooth weighted round
robin, standbys. Pure: the caller passes the clock readings, so all of it is tested on fake
time, without sockets."""

from __future__ import annotations

import enum
import random
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from forwarder.backoff import backoff_delays
from forwarder.config import ServerConfig
from forwarder.forward.errors import FailureKind

# --- server health ------------------------------------------------------------------------


class ServerState(enum.Enum):
    UP = "UP"
    DOWN = "DOWN"


@dataclass
class ServerHealth:
    """Whether a server may be sent chunks. Pure: the caller passes the clock readings.

    ::

        UP --failed(kind, now)--> DOWN (retry_at = now + backoff)
        DOWN --failed--> DOWN (a longer backoff)
        DOWN --succeeded--> UP (the backoff starts over)
        DOWN --answered_heartbeat(now), while UNREACHABLE--> DOWN, eligible at once

    A DOWN server is *eligible* again from ``retry_at``: the next chunk tries it, and that
    try decides (``succeeded`` or ``failed``)."""

    first_wait_s: float
    max_wait_s: float
    rng: random.Random | None = field(default=None, repr=False)
    state: ServerState = ServerState.UP
    retry_at: float = 0.0
    failures: int = 0
    """Consecutive failed attempts."""
    kind: FailureKind | None = None
    """The kind of the last failure, while DOWN."""
    down_since: float | None = None
    _delays: Iterator[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._delays = backoff_delays(self.first_wait_s, self.max_wait_s, rng=self.rng)

    def eligible(self, now: float) -> bool:
        return self.state is ServerState.UP or now >= self.retry_at

    @property
    def wants_heartbeat(self) -> bool:
        return self.state is ServerState.DOWN and self.kind is FailureKind.UNREACHABLE

    def failed(self, kind: FailureKind, now: float) -> float:
        """Mark it down; returns the delay before it is eligible again."""
        if self.state is ServerState.UP:
            self.down_since = now
        self.state = ServerState.DOWN
        self.kind = kind
        self.failures += 1
        delay = next(self._delays)
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.state = ServerState.UP
        self.kind = None
        self.failures = 0
        self.down_since = None
        self.retry_at = 0.0
        self._delays = backoff_delays(self.first_wait_s, self.max_wait_s, rng=self.rng)

    def answered_heartbeat(self, now: float) -> None:
        """A TCP connect went through: an unreachable server may be tried at once."""
        if self.wants_heartbeat:
            self.retry_at = min(self.retry_at, now)


# --- choosing a server -------------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


class SmoothWeightedRoundRobin(Generic[K]):
    """Nginx's smooth weighted round robin.

    Over every run of ``sum(weights)`` picks from the same members, each member is picked
    exactly ``weight`` times, and its picks are spread evenly (weights 3:1 give A A B A,
    not A A A B). When the set of members changes (a server goes down or comes back), the
    cycle starts over from zero, so nobody is owed picks from a past set."""

    def __init__(self) -> None:
        self._current: dict[K, int] = {}

    def pick(self, weights: Mapping[K, int]) -> K:
        if not weights:
            raise ValueError("pick() from no members")
        if weights.keys() != self._current.keys():
            self._current = dict.fromkeys(weights, 0)
        current = self._current
        total = 0
        best: K | None = None
        for member, weight in weights.items():
            current[member] += weight
            total += weight
            if best is None or current[member] > current[best]:
                best = member
        assert best is not None
        current[best] -= total
        return best


class Candidate(Protocol):
    """What :func:`select_server` reads of a server."""

    @property
    def config(self) -> ServerConfig: ...
    @property
    def health(self) -> ServerHealth: ...


def select_server(
    servers: Sequence[Candidate],
    balancer: SmoothWeightedRoundRobin[int],
    now: float,
    exclude: frozenset[int] = frozenset(),
) -> int | None:
    """The index of the server for the next chunk, or None when none may take it.

    Eligible primaries share chunks by weight; standbys (by weight among themselves) only
    while no primary is eligible. Weight 0 takes a server out, as in Fluentd. ``exclude``:
    servers already tried for this chunk."""
    for standby in (False, True):
        weights = {
            index: server.config.weight
            for index, server in enumerate(servers)
            if server.config.standby is standby
            and server.config.weight > 0
            and index not in exclude
            and server.health.eligible(now)
        }
        if weights:
            return balancer.pick(weights)
    return None
