"""Stats API samples to StatsEvent: the Docker CLI's figures on recorded v1 and documented v2."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from forwarder.docker.stats import (
    StatsSampleError,
    StatsSampler,
    block_io_bytes,
    cpu_percent,
    memory_usage_no_cache,
    read_time,
    stats_event,
)
from forwarder.records import ContainerInfo, EventTime, StatsEvent

DATA = Path(__file__).parent / "data" / "stats"


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def container_of(sample: dict[str, Any], image: str = "busybox:local") -> ContainerInfo:
    return ContainerInfo(id=sample["id"], name=sample["name"], image=image)


def cpu(total_usage: int, system_cpu_usage: int, online: int | None = 2) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "cpu_usage": {"total_usage": total_usage},
        "system_cpu_usage": system_cpu_usage,
    }
    if online is not None:
        stats["online_cpus"] = online
    return stats


# -- cgroup v1, recorded -----------------------------------------------------------------------


def test_v1_busy_stream_first_sample_has_no_cpu_figure() -> None:
    first, _ = load("v1_busy_stream.json")
    event = stats_event(container_of(first), first)
    assert event.cpu_percent is None
    assert "cpu_percent" not in event.record()
    assert event.online_cpus == 2


def test_v1_busy_stream_second_sample_matches_hand_computed_figures() -> None:
    _, second = load("v1_busy_stream.json")
    event = stats_event(container_of(second), second)
    # (26089864644 - 25102230918) / (662980000000 - 661020000000) * 2 CPUs * 100
    assert event.cpu_percent == pytest.approx(987_633_726 / 1_960_000_000 * 2 * 100, rel=1e-15)
    assert event.cpu_percent == pytest.approx(100.779, abs=1e-3)
    # total_inactive_file is 0: the usage is all there is
    assert event.memory_usage_bytes == 540_672
    assert event.memory_limit_bytes == 25_276_514_304
    assert event.memory_percent == pytest.approx(540_672 / 25_276_514_304 * 100, rel=1e-15)
    assert event.pids == 1
    assert event.online_cpus == 2
    assert event.container_id == second["id"]
    assert event.container_name == "/busy"
    assert event.image == "busybox:local"


def test_v1_no_networks_key_and_empty_blkio_read_as_zero() -> None:
    _, second = load("v1_busy_stream.json")
    assert "networks" not in second  # --network none
    assert second["blkio_stats"]["io_service_bytes_recursive"] == []
    event = stats_event(container_of(second), second)
    assert (event.network_rx_bytes, event.network_tx_bytes) == (0, 0)
    assert (event.network_rx_packets, event.network_tx_packets) == (0, 0)
    assert (event.block_read_bytes, event.block_write_bytes) == (0, 0)


def test_v1_idle_memory_subtracts_total_inactive_file_not_cache() -> None:
    _, second = load("v1_idle_stream.json")
    memory = second["memory_stats"]
    event = stats_event(container_of(second), second)
    # 4968448 - 4198400 (total_inactive_file); Docker <= 19.03 subtracted cache (4202496)
    assert event.memory_usage_bytes == 770_048
    assert event.memory_usage_bytes != memory["usage"] - memory["stats"]["cache"]
    assert event.memory_percent == pytest.approx(770_048 / 25_276_514_304 * 100, rel=1e-15)


def test_v1_idle_cpu_is_zero_when_usage_did_not_move() -> None:
    _, second = load("v1_idle_stream.json")
    assert (
        second["cpu_stats"]["cpu_usage"]["total_usage"]
        == (second["precpu_stats"]["cpu_usage"]["total_usage"])
    )
    assert stats_event(container_of(second), second).cpu_percent == 0.0


def test_v1_oneshot_alone_has_no_cpu_figure() -> None:
    for sample in load("v1_busy_oneshot.json"):
        assert stats_event(container_of(sample), sample).cpu_percent is None


def test_v1_oneshot_against_previous_sample() -> None:
    first, second = load("v1_busy_oneshot.json")
    event = stats_event(container_of(second), second, previous=first)
    # (11504977453 - 10481116155) / (633910000000 - 631890000000) * 2 * 100
    assert event.cpu_percent == pytest.approx(1_023_861_298 / 2_020_000_000 * 200, rel=1e-15)
    assert event.cpu_percent == pytest.approx(101.372, abs=1e-3)


def test_v1_poll_sample_uses_its_own_precpu_over_previous() -> None:
    sample = load("v1_busy_poll.json")
    stale = load("v1_busy_oneshot.json")[0]
    expected = 1_001_877_712 / 2_000_000_000 * 200  # 100.1877712
    assert stats_event(container_of(sample), sample).cpu_percent == pytest.approx(expected)
    with_previous = stats_event(container_of(sample), sample, previous=stale)
    assert with_previous.cpu_percent == pytest.approx(expected)


def test_v1_stopped_container_sample() -> None:
    sample = load("v1_stopped.json")
    event = stats_event(container_of(sample), sample)
    assert event.cpu_percent is None
    assert event.online_cpus is None
    assert event.memory_usage_bytes == 0
    assert event.memory_limit_bytes == 0
    assert event.memory_percent == 0.0
    assert event.pids == 0
    assert (event.block_read_bytes, event.block_write_bytes) == (0, 0)
    assert read_time(sample) is None


def test_v1_blkio_counts_read_and_write_ops_only() -> None:
    _, second = load("v1_busy_stream.json")
    sample = copy.deepcopy(second)
    entries = [
        ("Read", 4096),
        ("Write", 8192),
        ("Sync", 1),
        ("Async", 2),
        ("Discard", 4),
        ("Total", 12288),
        ("", 8),
    ]
    sample["blkio_stats"]["io_service_bytes_recursive"] = [
        {"major": 8, "minor": 0, "op": op, "value": value} for op, value in entries
    ] + [{"major": 8, "minor": 16, "op": "Read", "value": 100}]
    event = stats_event(container_of(sample), sample)
    assert (event.block_read_bytes, event.block_write_bytes) == (4196, 8192)


# -- cgroup v2, documented shape ---------------------------------------------------------------


def test_v2_stream_first_sample_has_no_cpu_figure() -> None:
    first, _ = load("v2_stream.json")
    event = stats_event(container_of(first), first)
    assert event.cpu_percent is None
    assert event.online_cpus == 4


def test_v2_stream_second_sample_matches_hand_computed_figures() -> None:
    _, second = load("v2_stream.json")
    assert "percpu_usage" not in second["cpu_stats"]["cpu_usage"]
    assert "total_inactive_file" not in second["memory_stats"]["stats"]
    event = stats_event(container_of(second, image="nginx:1.27"), second)
    assert event.cpu_percent == 25.0  # 250e6 / 4e9 * 4 CPUs * 100
    assert event.online_cpus == 4
    assert event.memory_usage_bytes == 7_886_080  # 10396928 - 2510848 (inactive_file)
    assert event.memory_limit_bytes == 8_217_579_520
    assert event.memory_percent == pytest.approx(7_886_080 / 8_217_579_520 * 100, rel=1e-15)
    assert event.network_rx_bytes == 9979
    assert event.network_tx_bytes == 1338
    assert event.network_rx_packets == 62
    assert event.network_tx_packets == 17
    assert event.block_read_bytes == 7_598_080
    assert event.block_write_bytes == 8292
    assert event.pids == 5
    assert event.image == "nginx:1.27"


def test_v2_null_blkio_lists_and_missing_sections_read_as_zero() -> None:
    _, second = load("v2_stream.json")
    sample = copy.deepcopy(second)
    sample["blkio_stats"]["io_service_bytes_recursive"] = None
    del sample["networks"]
    del sample["pids_stats"]
    event = stats_event(container_of(sample), sample)
    assert (event.block_read_bytes, event.block_write_bytes) == (0, 0)
    assert event.network_rx_bytes == event.network_tx_bytes == 0
    assert event.network_rx_packets == event.network_tx_packets == 0
    assert event.pids == 0
    del sample["blkio_stats"]
    assert stats_event(container_of(sample), sample).block_read_bytes == 0


def test_zero_limit_gives_zero_memory_percent() -> None:
    _, second = load("v2_stream.json")
    sample = copy.deepcopy(second)
    del sample["memory_stats"]["limit"]
    event = stats_event(container_of(sample), sample)
    assert event.memory_usage_bytes == 7_886_080
    assert event.memory_limit_bytes == 0
    assert event.memory_percent == 0.0


# -- the pieces of the CLI's arithmetic ----------------------------------------------------------


def test_cpu_percent_falls_back_to_percpu_usage_length() -> None:
    current = cpu(3_000, 10_000, online=None)
    current["cpu_usage"]["percpu_usage"] = [1, 1, 1, 1]
    assert cpu_percent(current, cpu(1_000, 6_000)) == 2_000 / 4_000 * 4 * 100


@pytest.mark.parametrize(
    ("current", "previous", "expected"),
    [
        pytest.param(cpu(500, 20_000), cpu(1_000, 10_000), 0.0, id="usage-went-back"),
        pytest.param(cpu(1_000, 10_000), cpu(1_000, 5_000), 0.0, id="no-usage"),
        pytest.param(cpu(2_000, 10_000), cpu(1_000, 10_000), 0.0, id="no-system-time"),
        pytest.param(cpu(2_000, 10_000), cpu(1_000, 20_000), 0.0, id="system-went-back"),
        pytest.param(cpu(2_000, 10_000), cpu(0, 0), None, id="empty-previous"),
        pytest.param(cpu(2_000, 10_000), {}, None, id="absent-previous"),
        pytest.param(cpu(0, 0), cpu(1_000, 10_000), None, id="empty-current"),
        pytest.param(cpu(2_000, 14_000), cpu(1_000, 10_000), 50.0, id="half-a-core"),
    ],
)
def test_cpu_percent_edges(
    current: dict[str, Any], previous: dict[str, Any], expected: float | None
) -> None:
    assert cpu_percent(current, previous) == expected


def test_cpu_percent_rounds_as_go_does_past_2_to_the_53() -> None:
    # The CLI converts each counter to float64 before subtracting. Near 2**60 a float64 is a
    # multiple of 256, so deltas of 3e9 + 1 and 1e9 + 1 ns read as 3e9 and 1e9: the CLI
    # shows 600.0 % where exact integer deltas would give 599.9999996 %.
    base = 2**60 + 100
    current = cpu(base + 3_000_000_001, base + 1_000_000_001)
    previous = cpu(base, base)
    assert cpu_percent(current, previous) == 600.0
    assert 3_000_000_001 / 1_000_000_001 * 2 * 100 != 600.0
    assert 3_000_000_001 / 1_000_000_000 * 2 * 100 != 600.0
    assert 3_000_000_000 / 1_000_000_001 * 2 * 100 != 600.0


@pytest.mark.parametrize(
    ("memory_stats", "expected"),
    [
        pytest.param(
            {"usage": 1000, "stats": {"total_inactive_file": 300, "inactive_file": 100}},
            700,
            id="v1",
        ),
        pytest.param(
            {"usage": 1000, "stats": {"total_inactive_file": 1000, "inactive_file": 100}},
            900,
            id="v1-total-not-smaller-falls-back-to-inactive-file",
        ),
        pytest.param(
            {"usage": 1000, "stats": {"total_inactive_file": 2000, "inactive_file": 1000}},
            1000,
            id="v1-neither-smaller",
        ),
        pytest.param({"usage": 1000, "stats": {"inactive_file": 250}}, 750, id="v2"),
        pytest.param({"usage": 1000, "stats": {"inactive_file": 1000}}, 1000, id="v2-not-smaller"),
        pytest.param({"usage": 1000}, 1000, id="no-stats"),
        pytest.param({}, 0, id="empty"),
    ],
)
def test_memory_usage_no_cache(memory_stats: dict[str, Any], expected: int) -> None:
    assert memory_usage_no_cache(memory_stats) == expected


def test_block_io_on_v2_lowercase_ops() -> None:
    blkio = {
        "io_service_bytes_recursive": [
            {"major": 254, "minor": 0, "op": "read", "value": 10},
            {"major": 254, "minor": 0, "op": "write", "value": 20},
            {"major": 254, "minor": 1, "op": "read", "value": 30},
        ]
    }
    assert block_io_bytes(blkio) == (40, 20)
    assert block_io_bytes({"io_service_bytes_recursive": None}) == (0, 0)
    assert block_io_bytes({}) == (0, 0)


# -- the sampler -------------------------------------------------------------------------------


def test_sampler_on_oneshot_polls_computes_cpu_from_the_second_poll() -> None:
    first, second = load("v1_busy_oneshot.json")
    sampler = StatsSampler(container_of(first))
    assert not sampler.primed
    assert sampler.feed(first).cpu_percent is None
    assert sampler.primed
    assert sampler.feed(second).cpu_percent == pytest.approx(1_023_861_298 / 2_020_000_000 * 200)
    assert "primed" in repr(sampler)
    assert "/busy" in repr(sampler)


def test_sampler_on_a_stream_follows_precpu() -> None:
    first, second = load("v2_stream.json")
    sampler = StatsSampler(container_of(first))
    assert [sampler.feed(first).cpu_percent, sampler.feed(second).cpu_percent] == [None, 25.0]


def test_sampler_forgets_the_previous_sample_when_the_container_stops() -> None:
    first, second = load("v1_busy_oneshot.json")
    stopped = load("v1_stopped.json")
    stopped["id"], stopped["name"] = first["id"], first["name"]
    sampler = StatsSampler(container_of(first))
    sampler.feed(first)
    assert sampler.feed(stopped).cpu_percent is None
    assert not sampler.primed
    assert sampler.feed(second).cpu_percent is None


# -- errors, time, model -------------------------------------------------------------------------


def test_sample_of_another_container_is_refused() -> None:
    first, _ = load("v1_busy_stream.json")
    other, _ = load("v1_idle_stream.json")
    with pytest.raises(ValueError, match="given for"):
        stats_event(container_of(other), first)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("memory_stats", "usage"), "540672", id="string-counter"),
        pytest.param(("memory_stats", "usage"), -1, id="negative-counter"),
        pytest.param(("memory_stats", "usage"), 1.5, id="float-counter"),
        pytest.param(("pids_stats", "current"), True, id="bool-counter"),
        pytest.param(("cpu_stats",), [], id="array-for-object"),
        pytest.param(("blkio_stats", "io_service_bytes_recursive"), {}, id="object-for-array"),
        pytest.param(("blkio_stats", "io_service_bytes_recursive"), [7], id="bad-blkio-entry"),
        pytest.param(
            ("blkio_stats", "io_service_bytes_recursive"), [{"op": 1, "value": 2}], id="bad-op"
        ),
    ],
)
def test_malformed_sample_is_the_engines_fault(path: tuple[str, ...], value: object) -> None:
    _, second = load("v1_busy_stream.json")
    sample = copy.deepcopy(second)
    target = sample
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(StatsSampleError):
        stats_event(container_of(second), sample)


def test_read_time_keeps_nanoseconds() -> None:
    _, second = load("v1_busy_stream.json")
    assert second["read"] == "2026-11-25T07:17:39.907537379Z"
    assert read_time(second) == EventTime(1_795_591_059, 907_537_379)
    assert read_time({"read": "2026-11-25T08:17:39.5+01:00"}) == EventTime(
        1_795_591_059, 500_000_000
    )
    assert read_time({"read": "2026-11-25T07:17:39Z"}) == EventTime(1_795_591_059, 0)
    assert read_time({"read": "0001-01-01T00:00:00Z"}) is None
    assert read_time({}) is None
    for bad in ("yesterday", "2026-11-25 07:17:39Z", "2026-11-25T07:17:39.1234567890Z", 17):
        with pytest.raises(StatsSampleError):
            read_time({"read": bad})


def test_event_validates_and_round_trips_through_the_model() -> None:
    _, second = load("v2_stream.json")
    event = stats_event(container_of(second), second)
    record = event.record()
    assert set(record) == set(StatsEvent.model_fields)
    assert StatsEvent.model_validate(record) == event
    assert StatsEvent.model_validate_json(event.model_dump_json()) == event


def test_event_model_rejects_a_bad_container_id() -> None:
    first, _ = load("v2_stream.json")
    record = stats_event(container_of(first), first).record()
    assert "cpu_percent" not in record
    with pytest.raises(ValidationError):
        StatsEvent.model_validate({**record, "container_id": "ede54ee1afda"})
    with pytest.raises(ValidationError):
        StatsEvent.model_validate({**record, "memory_rss_bytes": 1})
