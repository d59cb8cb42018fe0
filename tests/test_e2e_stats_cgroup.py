"""Stats of one real container from both sources: the Stats API and the cgroup files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forwarder.docker.cgroup import CgroupUnavailableError, locate
from forwarder.docker.stats import stats_event
from forwarder.records import ContainerInfo, StatsEvent
from tests.harness.engine import Engine


def api_sample(engine: Engine, cid: str) -> dict[str, Any]:
    status, body = engine.api("GET", f"/containers/{cid}/stats?stream=0&one-shot=1")
    assert status == 200
    sample: dict[str, Any] = json.loads(body)
    return sample


def test_both_sources_give_the_same_record(engine: Engine) -> None:
    # Some memory in the page cache (inactive_file), some CPU, two processes.
    cid = engine.run(
        "sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1k count=2000 2>/dev/null; sleep 600 & wait"
    )
    pid = int(engine.inspect(cid)["State"]["Pid"])
    try:
        files = locate(pid, cgroup_root=Path("/sys/fs/cgroup"), proc_root=Path("/proc"))
    except CgroupUnavailableError as exc:
        pytest.skip(f"the engine's cgroup files are not readable here: {exc}")
    container = ContainerInfo(id=cid, name="/stats", image="busybox")
    from_api = stats_event(container, api_sample(engine, cid))
    from_files = stats_event(container, files.sample(read_ns=0))
    from_api_again = stats_event(container, api_sample(engine, cid))
    StatsEvent.model_validate(from_files.record())
    assert from_files.record().keys() == from_api.record().keys()
    same = (
        "online_cpus",
        "memory_limit_bytes",
        "pids",
        "network_rx_bytes",
        "network_tx_bytes",
        "block_read_bytes",
        "block_write_bytes",
    )
    for key in same:
        assert getattr(from_files, key) == getattr(from_api, key), key
    # Memory moves a little between reads: within 64 KiB of one of the API's two readings.
    low = min(from_api.memory_usage_bytes, from_api_again.memory_usage_bytes) - 65536
    high = max(from_api.memory_usage_bytes, from_api_again.memory_usage_bytes) + 65536
    assert low <= from_files.memory_usage_bytes <= high
