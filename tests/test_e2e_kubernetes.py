"""The Kubernetes source end to end: podman's conmon writes CRI logs into a pods directory
laid out as the kubelet does, forwarder ([docker] off, [kubernetes] on) ships them to a
real Forward receiver, and the test rotates the log as the kubelet does (rename, conmon
reopens on ``2 0 0``, the older rotated file gzipped)."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.collector import CollectorProcess, write_config
from tests.harness.podman import Podman, podman_or_skip
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver

MakeReceiver = Callable[..., ForwardReceiver]


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    base = Path("/tmp") / f"fwd-podman-{uuid.uuid4().hex[:8]}"  # short: conmon's socket paths
    base.mkdir()
    try:
        yield podman_or_skip(base)
    finally:
        with contextlib.suppress(Exception):
            Podman(base)("rm", "-a", "-f")
        shutil.rmtree(base, ignore_errors=True)


def kubelet_layout(root: Path, podman: Podman, script: str) -> tuple[str, Path, Path, Path]:
    """A pod ``web-0`` in namespace ``shop`` with container ``app`` (restart 0), its log
    written by conmon at ``pods/shop_web-0_<uid>/app/0.log``, and the kubelet's link."""
    pods, links = root / "pods", root / "containers"
    uid = str(uuid.uuid4())
    ctr_dir = pods / f"shop_web-0_{uid}" / "app"
    ctr_dir.mkdir(parents=True)
    links.mkdir()
    log = ctr_dir / "0.log"
    cid = podman.create(log, script)
    os.symlink(log, links / f"web-0_shop_app-{cid}.log")
    return cid, pods, links, log


def collector_for(root: Path, server: str, pods: Path, links: Path) -> CollectorProcess:
    config: dict[str, dict[str, Any]] = {
        "docker": {"enabled": False},
        "kubernetes": {"enabled": True, "pods_dir": str(pods), "containers_dir": str(links)},
        "output": {"servers": [server], "flush_interval": "200ms", "retry_wait": "100ms"},
        "state": {"dir": str(root / "state")},
        "stats": {"interval": "0s"},
    }
    path = write_config(root / "forwarder.toml", config)
    return CollectorProcess(path, dict(os.environ), root)


def numbered(records: list[Any]) -> list[int]:
    return [int(r["record"]["log"].split()[1]) for r in records if "kubernetes" in r["record"]]


def test_numbered_lines_through_kubelet_rotations_with_tag_and_kubernetes_map(
    podman: Podman, make_forward_receiver: MakeReceiver, tmp_path: Path
) -> None:
    total = 3000
    # 100 lines of about 60 bytes every 50 ms: the log grows while it is rotated.
    script = (
        f"i=0; while [ $i -lt {total} ]; do echo \"line $i $(printf '%040d' $i)\"; "
        "i=$((i+1)); [ $((i % 100)) -eq 0 ] && sleep 0.05; done; sleep 1"
    )
    cid, pods, links, log = kubelet_layout(tmp_path, podman, script)
    receiver = make_forward_receiver()
    collector = collector_for(tmp_path, receiver.address, pods, links).start()
    try:
        podman("start", cid)
        rotated: list[Path] = []
        for n in range(3):
            wait_until(
                lambda: log.exists() and log.stat().st_size > 30_000,
                timeout=30,
                what="the log to grow",
            )
            # The kubelet: rename, ask the runtime to reopen, gzip all but the newest rotated.
            target = log.with_name(f"0.log.20260101-00000{n}")
            log.rename(target)
            podman.reopen_log(cid)
            for older in rotated:
                with older.open("rb") as src, gzip.open(f"{older}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                older.unlink()
            rotated = [target]
        podman("wait", cid, timeout=120)
        records = receiver.wait_for(lambda rs: len(numbered(rs)) >= total, timeout=60)
    finally:
        collector.stop()
    got = numbered(records)
    assert sorted(got) == list(range(total)), collector.log()[-2000:]
    assert len(got) == total  # nothing twice
    assert sorted(p.name for p in log.parent.iterdir()) == [
        "0.log",
        "0.log.20260101-000000.gz",
        "0.log.20260101-000001.gz",
        "0.log.20260101-000002",
    ]
    first = next(r for r in records if "kubernetes" in r["record"])
    assert first["tag"] == f"kubernetes.var.log.containers.web-0_shop_app-{cid}.log"
    record = first["record"]
    assert set(record) == {"stream", "logtag", "log", "kubernetes"}
    assert (record["stream"], record["logtag"]) == ("stdout", "F")
    pod_dir = log.parent.parent.name
    assert record["kubernetes"] == {
        "namespace_name": "shop",
        "pod_name": "web-0",
        "pod_id": pod_dir.split("_")[2],
        "container_name": "app",
        "container_id": cid,
        "restart_count": 0,
    }
    assert "gap" not in collector.log().lower()
