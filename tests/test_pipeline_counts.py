"""The counts the status line and the last log line show: log lines and records by kind."""

from __future__ import annotations

import asyncio
from pathlib import Path

from forwarder.chunks import kind_of_payload
from forwarder.forward.protocol import encode_entries, encode_log_entries, encode_message
from forwarder.records import LifecycleEvent, LogLine, StatsEvent
from tests.helpers import CID


def _stats() -> dict[str, object]:
    return StatsEvent(
        container_id=CID,
        container_name="/web",
        image="busybox",
        memory_usage_bytes=1,
        memory_limit_bytes=2,
        memory_percent=50.0,
        network_rx_bytes=0,
        network_tx_bytes=0,
        network_rx_packets=0,
        network_tx_packets=0,
        block_read_bytes=0,
        block_write_bytes=0,
        pids=1,
    ).record()


def test_a_chunk_read_back_from_disk_is_counted_by_its_kind() -> None:
    """The disk buffer keeps no kind: it is told from the records, compressed or not."""
    logs = encode_log_entries(CID, "/web", [LogLine("stdout", 1, "hello")])
    stats = encode_entries([(1, _stats())])
    lifecycle = encode_entries(
        [
            (
                1,
                LifecycleEvent(
                    action="die", container_id=CID, container_name="/web", image="b"
                ).record(),
            )
        ]
    )
    for compress in (False, True):
        payloads = {
            kind: encode_message("t", entries, 1, chunk_id=None, compress=compress)
            for kind, entries in (("log", logs), ("stats", stats), ("lifecycle", lifecycle))
        }
        assert {kind: kind_of_payload(p) for kind, p in payloads.items()} == {
            "log": "log",
            "stats": "stats",
            "lifecycle": "lifecycle",
        }


def test_the_readme_shows_every_status_field_and_explains_each(tmp_path: Path) -> None:
    from forwarder.config import config_from_dict
    from forwarder.pipeline import Pipeline

    async def fields() -> list[str]:
        config = config_from_dict({"state": {"dir": str(tmp_path)}}, env={})
        pipeline = Pipeline(config)
        try:
            return list(pipeline.status())
        finally:
            await pipeline.engine.aclose()

    keys = asyncio.run(fields())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("\nstatus: ", 1)[1].split("```", 1)[0]
    assert [item.split("=")[0] for item in example.split()] == keys
    for key in keys:
        assert f"`{key}`" in readme.split("| field | meaning |", 1)[1].split("\n\n", 1)[0], key
