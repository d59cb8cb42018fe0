"""Stats samples from cgroup files: v1 files recorded from engine 20.10's containers, v2
files in the kernel's documented format (cgroup-v2.rst), and the figures stats.py gives."""

from __future__ import annotations

from pathlib import Path

from forwarder.docker.cgroup import (
    parse_cgroup_paths,
    parse_io_stat,
    parse_net_dev,
    parse_proc_stat_ns,
    sample_v1,
    sample_v2,
)
from forwarder.docker.stats import stats_event
from forwarder.records import ContainerInfo
from tests.helpers import CID

DATA = Path(__file__).parent / "data" / "cgroup"
CONTAINER = ContainerInfo(id=CID, name="/web", image="busybox")
GIB = 1 << 30

NET_DEV = (DATA / "net-dev-two-interfaces").read_text()


def files(version: str) -> dict[str, str]:
    return {path.name: path.read_text() for path in (DATA / version).iterdir()}


def test_v1_sample_gives_the_api_figures() -> None:
    recorded = files("v1")
    system_ns = parse_proc_stat_ns(recorded["proc-stat"])
    sample = sample_v1(
        recorded | {"net/dev": recorded["net-dev"]},
        read_ns=1_800_000_000_000_000_000,
        system_ns=system_ns,
        online_cpus=2,
        host_memory=24 * GIB,
    )
    event = stats_event(CONTAINER, sample)
    # usage_in_bytes 847872 minus total_inactive_file 512000 (dd wrote 500 KiB to /tmp).
    assert event.memory_usage_bytes == 847872 - 512000
    # No limit: the cgroup's 9223372036854771712 becomes the host's memory, as in the engine.
    assert event.memory_limit_bytes == 24 * GIB
    assert event.pids == 1
    assert event.online_cpus == 2
    assert event.cpu_percent is None  # one sample: nothing to compare against
    assert (event.network_rx_bytes, event.network_tx_bytes) == (0, 0)  # --network none: lo only
    assert sample["cpu_stats"]["cpu_usage"]["total_usage"] == int(recorded["cpuacct.usage"])
    assert sum(sample["cpu_stats"]["cpu_usage"]["percpu_usage"]) <= int(recorded["cpuacct.usage"])


def test_v1_cpu_percent_between_two_samples() -> None:
    recorded = files("v1")

    def at(usage_ns: int, system_ns: int) -> dict[str, object]:
        return sample_v1(
            recorded | {"cpuacct.usage": f"{usage_ns}\n"},
            read_ns=1,
            system_ns=system_ns,
            online_cpus=2,
            host_memory=GIB,
        )

    event = stats_event(CONTAINER, at(1_500_000_000, 20 * 10**9), previous=at(10**9, 10 * 10**9))
    assert event.cpu_percent == 0.5e9 / 10e9 * 2 * 100


def test_v2_sample_gives_the_api_figures() -> None:
    sample = sample_v2(
        files("v2") | {"net/dev": NET_DEV},
        read_ns=1,
        system_ns=10**9,
        online_cpus=4,
        host_memory=GIB,
    )
    event = stats_event(CONTAINER, sample)
    assert sample["cpu_stats"]["cpu_usage"] == {"total_usage": 123456 * 1000}
    assert event.memory_usage_bytes == 4194304 - 2097152  # memory.current - inactive_file
    assert event.memory_limit_bytes == GIB  # "max": the host's memory
    assert (event.block_read_bytes, event.block_write_bytes) == (4196, 8192)
    assert (event.network_rx_bytes, event.network_tx_bytes) == (5100, 7200)
    assert (event.network_rx_packets, event.network_tx_packets) == (51, 72)
    assert event.pids == 3


def test_v2_limit_below_the_host_memory_is_kept() -> None:
    sample = sample_v2(
        files("v2") | {"memory.max": "268435456\n"},
        read_ns=1,
        system_ns=1,
        online_cpus=1,
        host_memory=GIB,
    )
    assert stats_event(CONTAINER, sample).memory_limit_bytes == 268435456
    assert "networks" not in sample  # no net/dev read: no interfaces, as for --network none


def test_net_dev_leaves_lo_out() -> None:
    assert sorted(parse_net_dev(NET_DEV)) == ["eth0", "eth1"]
    assert parse_net_dev(NET_DEV)["eth0"]["rx_dropped"] == 2


def test_io_stat_ops_are_the_engines() -> None:
    ops = [(e["op"], e["value"]) for e in parse_io_stat("8:16 rbytes=1 wbytes=2 rios=3\n")]
    assert ops == [("read", 1), ("write", 2)]


def test_proc_stat_is_the_first_seven_fields_in_ns() -> None:
    assert parse_proc_stat_ns("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 1 1 1 1 1 1\n") == 28 * 10**7


def test_cgroup_paths_v1_joined_controllers_and_v2() -> None:
    paths = parse_cgroup_paths("4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n0::/docker/abc\n")
    assert paths == {
        "cpu": "/docker/abc",
        "cpuacct": "/docker/abc",
        "memory": "/docker/abc",
        "": "/docker/abc",
    }
