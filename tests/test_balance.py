"""The Forward output's pure policy, on fake time and without sockets: backoff, server
health, failure kinds, smooth weighted round robin, standbys and weights."""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from typing import Any

import pytest

from forwarder.backoff import backoff_delays
from forwarder.config import OutputConfig, ServerConfig, config_from_dict
from forwarder.forward.balance import (
    ServerHealth,
    ServerState,
    SmoothWeightedRoundRobin,
    select_server,
)
from forwarder.forward.errors import (
    AckTimeoutError,
    AuthError,
    ConnectError,
    ConnectionLostError,
    FailureKind,
    TLSHandshakeError,
)

# --- backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_backoff_doubles_within_jitter_bounds_up_to_the_cap(seed: int) -> None:
    delays = backoff_delays(1.0, 60.0, rng=random.Random(seed))
    nominal = 1.0
    for _ in range(20):
        delay = next(delays)
        assert nominal / 2 <= delay <= nominal
        nominal = min(nominal * 2, 60.0)
    assert nominal == 60.0  # the cap was reached, and held (checked by the loop's bounds)


def test_backoff_jitter_spreads_collectors_that_start_together() -> None:
    firsts = {round(next(backoff_delays(1.0, 60.0, rng=random.Random(s))), 6) for s in range(20)}
    assert len(firsts) == 20


# --- server health ------------------------------------------------------------------------


def health(first: float = 1.0, cap: float = 8.0) -> ServerHealth:
    # rng whose uniform(a, b) is always b: the nominal delays, exactly
    class Top(random.Random):
        def uniform(self, _a: float, b: float) -> float:
            return b

    return ServerHealth(first, cap, rng=Top())


def test_health_starts_up_and_eligible() -> None:
    h = health()
    assert h.state is ServerState.UP
    assert h.eligible(0.0)
    assert not h.wants_heartbeat


def test_a_failure_marks_down_until_the_backoff_ends() -> None:
    h = health()
    assert h.failed(FailureKind.BROKEN, now=100.0) == 1.0
    assert h.state is ServerState.DOWN
    assert h.down_since == 100.0
    assert not h.eligible(100.5)
    assert h.eligible(101.0)


def test_consecutive_failures_grow_the_backoff_to_its_cap_and_success_resets_it() -> None:
    h = health(first=1.0, cap=8.0)
    assert [h.failed(FailureKind.REFUSED, now=float(t)) for t in range(6)] == [1, 2, 4, 8, 8, 8]
    assert h.failures == 6
    assert h.down_since == 0.0  # the first failure's time
    h.succeeded()
    assert h.state is ServerState.UP
    assert h.failures == 0
    assert h.down_since is None
    assert h.failed(FailureKind.REFUSED, now=50.0) == 1.0


def test_only_an_unreachable_server_wants_a_heartbeat() -> None:
    for kind, wants in [
        (FailureKind.UNREACHABLE, True),
        (FailureKind.REFUSED, False),
        (FailureKind.BROKEN, False),
    ]:
        h = health()
        h.failed(kind, now=0.0)
        assert h.wants_heartbeat is wants, kind


def test_a_heartbeat_makes_an_unreachable_server_eligible_at_once() -> None:
    h = health(first=30.0, cap=60.0)
    h.failed(FailureKind.UNREACHABLE, now=0.0)
    assert not h.eligible(5.0)
    h.answered_heartbeat(now=5.0)
    assert h.eligible(5.0)
    assert h.state is ServerState.DOWN  # the next real attempt decides


def test_a_heartbeat_does_not_shorten_a_refusal() -> None:
    h = health(first=30.0, cap=60.0)
    h.failed(FailureKind.REFUSED, now=0.0)
    h.answered_heartbeat(now=5.0)
    assert not h.eligible(5.0)


def test_failure_kinds_of_the_errors() -> None:
    assert ConnectError("x").kind is FailureKind.UNREACHABLE
    assert TLSHandshakeError("x").kind is FailureKind.REFUSED
    assert AuthError("x").kind is FailureKind.REFUSED
    assert ConnectionLostError("x").kind is FailureKind.BROKEN
    assert AckTimeoutError("x").kind is FailureKind.BROKEN


# --- smooth weighted round robin ----------------------------------------------------------


def picks(
    weights: dict[str, int], n: int, swrr: SmoothWeightedRoundRobin[str] | None = None
) -> str:
    swrr = swrr or SmoothWeightedRoundRobin()
    return "".join(swrr.pick(weights) for _ in range(n))


def test_swrr_interleaves_like_nginx() -> None:
    assert picks({"a": 5, "b": 1, "c": 1}, 7) == "aabacaa"  # nginx's documented sequence
    assert picks({"a": 3, "b": 1}, 8) == "aabaaaba"
    assert picks({"a": 1, "b": 1}, 4) == "abab"


@pytest.mark.parametrize("seed", range(20))
def test_swrr_gives_exact_shares_over_every_cycle(seed: int) -> None:
    rand = random.Random(seed)
    weights = {name: rand.randint(1, 9) for name in "abcde"[: rand.randint(1, 5)]}
    total = sum(weights.values())
    swrr: SmoothWeightedRoundRobin[str] = SmoothWeightedRoundRobin()
    for _ in range(3):
        assert collections.Counter(picks(weights, total, swrr)) == weights


def test_swrr_never_gives_a_member_two_turns_more_than_its_share_in_a_row() -> None:
    # 1:1:1:...:10 - the heavy member's picks are spread out, not bunched.
    weights = {"heavy": 10, **{f"l{i}": 1 for i in range(5)}}
    sequence = [SmoothWeightedRoundRobin[str]().pick(weights)]
    swrr: SmoothWeightedRoundRobin[str] = SmoothWeightedRoundRobin()
    sequence = [swrr.pick(weights) for _ in range(15)]
    longest = max(
        len(run) for run in "".join("H" if s == "heavy" else "." for s in sequence).split(".")
    )
    assert longest <= 3


def test_swrr_starts_over_when_the_members_change() -> None:
    swrr: SmoothWeightedRoundRobin[str] = SmoothWeightedRoundRobin()
    assert picks({"a": 3, "b": 1}, 2, swrr) == "aa"
    assert picks({"a": 3}, 5, swrr) == "aaaaa"  # b went away
    # b is back: a fresh cycle (a a b a), b is neither owed nor owing past turns
    assert picks({"a": 3, "b": 1}, 8, swrr) == "aabaaaba"


def test_swrr_refuses_an_empty_set() -> None:
    with pytest.raises(ValueError, match="from no members"):
        SmoothWeightedRoundRobin[str]().pick({})


# --- selection: primaries, standbys, weight 0 ---------------------------------------------


def output_config(*servers: dict[str, Any] | str, **output: Any) -> OutputConfig:
    return config_from_dict({"output": {"servers": list(servers), **output}}, env={}).output


@dataclass
class Candidate:
    """What select_server reads of a server: no connection needed."""

    config: ServerConfig
    health: ServerHealth


def make_servers(cfg: OutputConfig) -> list[Candidate]:
    return [Candidate(config=server, health=health()) for server in cfg.servers]


def test_standby_stays_idle_while_a_primary_is_eligible() -> None:
    servers = make_servers(
        output_config(
            "tcp://a:1", "tcp://b:1", {"url": "tcp://s:1", "standby": True, "weight": 100}
        )
    )
    swrr: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
    assert {select_server(servers, swrr, 0.0) for _ in range(20)} == {0, 1}
    servers[0].health.failed(FailureKind.UNREACHABLE, 0.0)
    assert {select_server(servers, swrr, 0.1) for _ in range(20)} == {1}
    servers[1].health.failed(FailureKind.REFUSED, 0.0)
    assert {select_server(servers, swrr, 0.1) for _ in range(20)} == {2}
    # a primary's backoff ends: it is tried before the standby again
    assert select_server(servers, swrr, 1.0) in {0, 1}


def test_standbys_share_by_weight_among_themselves() -> None:
    servers = make_servers(
        output_config(
            "tcp://a:1",
            {"url": "tcp://s1:1", "standby": True, "weight": 2},
            {"url": "tcp://s2:1", "standby": True, "weight": 1},
        )
    )
    servers[0].health.failed(FailureKind.BROKEN, 0.0)
    swrr: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
    chosen = [select_server(servers, swrr, 0.0) for _ in range(30)]
    assert collections.Counter(chosen) == {1: 20, 2: 10}


def test_weight_zero_takes_a_server_out() -> None:
    servers = make_servers(output_config({"url": "tcp://a:1", "weight": 0}, "tcp://b:1"))
    swrr: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
    assert {select_server(servers, swrr, 0.0) for _ in range(10)} == {1}
    servers[1].health.failed(FailureKind.BROKEN, 0.0)
    assert select_server(servers, swrr, 0.0) is None


def test_servers_already_tried_for_a_chunk_are_skipped() -> None:
    servers = make_servers(output_config("tcp://a:1", "tcp://b:1"))
    swrr: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
    assert select_server(servers, swrr, 0.0, frozenset({0})) == 1
    assert select_server(servers, swrr, 0.0, frozenset({0, 1})) is None


def test_weights_3_to_1_share_chunks_3_to_1_and_interleave() -> None:
    servers = make_servers(
        output_config({"url": "tcp://a:1", "weight": 3}, {"url": "tcp://b:1", "weight": 1})
    )
    swrr: SmoothWeightedRoundRobin[int] = SmoothWeightedRoundRobin()
    chosen = [select_server(servers, swrr, 0.0) for _ in range(400)]
    assert collections.Counter(chosen) == {0: 300, 1: 100}
    assert chosen[:4] == [0, 0, 1, 0]


def test_config_refuses_all_weights_zero() -> None:
    from forwarder.config import ConfigError

    with pytest.raises(ConfigError, match="weight 0"):
        output_config({"url": "tcp://a:1", "weight": 0})
