"""The API source after a restart across rotations: every line the engine holds, once.

The oracle is a logs request without ``follow`` made by the test: on this engine it returns
every file the engine kept (the current one and the rotated ones).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from forwarder.docker.frames import Demuxer
from tests.harness.collector import CollectorProcess
from tests.harness.engine import Engine
from tests.harness.polling import wait_until
from tests.harness.receivers import ForwardReceiver

MakeCollector = Callable[..., CollectorProcess]
Line = tuple[int, str]  # (engine timestamp in ns, text)

# 300 lines; at /tmp/go1 3,000 more as fast as the shell goes (about 60 rotations of 50 kB
# with max-file=2 keep only the last ~1,100); at /tmp/go2 200 more, 10 every 50 ms.
SCRIPT = (
    "seq 1 300 | sed 's/^/r/'; "
    "while [ ! -e /tmp/go1 ]; do sleep 0.05; done; "
    "seq 301 3300 | sed 's/^/r/'; "
    "while [ ! -e /tmp/go2 ]; do sleep 0.05; done; "
    "b=3300; while [ $b -lt 3500 ]; do seq $((b+1)) $((b+10)) | sed 's/^/r/'; "
    "b=$((b+10)); sleep 0.05; done; sleep 600"
)

COLLECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "output": {"flush_interval": "100ms", "ack_timeout": "2s", "heartbeat_interval": "200ms"},
    "service": {"shutdown_timeout": "3s"},
}


def engine_lines(engine: Engine, cid: str) -> list[Line]:
    """What the engine holds, read without ``follow``: its truth."""
    raw = Demuxer().feed(engine.logs_api_bytes(cid, timestamps=True))
    return [(line.ts_ns, line.data.decode()) for line in raw]


def received(records: list[Any], cid: str) -> Counter[Line]:
    return Counter(
        (r["time_ns"], r["record"]["log"])
        for r in records
        if r["record"]["container_id"] == cid and "log" in r["record"]
    )


def arrived(cid: str, text: str) -> Callable[[list[Any]], bool]:
    def probe(records: list[Any]) -> bool:
        return any(line == text for _, line in received(records, cid))

    return probe


def test_restart_after_rotation_gets_every_kept_line_once(
    engine: Engine, forward_receiver: ForwardReceiver, make_collector: MakeCollector
) -> None:
    collector = make_collector(forward_receiver.address)
    cid = engine.run(
        "sh", "-c", SCRIPT, options=["--log-opt", "max-size=50k", "--log-opt", "max-file=2"]
    )
    forward_receiver.wait_for(arrived(cid, "r300"), 30)
    assert collector.terminate()[0] == 0

    # While the collector is down the log rotates many times; the engine keeps two files.
    engine.docker("exec", cid, "touch", "/tmp/go1")

    def all_logged() -> list[Line] | None:
        lines = engine_lines(engine, cid)
        return lines if lines and lines[-1][1] == "r3300" else None

    kept = wait_until(all_logged, timeout=30, what="r3300 in the engine's log")
    assert kept[0][1] != "r1", "the log must have rotated lines away"
    assert len(kept) > 500, "two 50 kB files hold several hundred lines"

    collector.start()
    forward_receiver.wait_for(arrived(cid, "r3300"), 30)
    # Then lines written while following: the seam between catching up and following.
    engine.docker("exec", cid, "touch", "/tmp/go2")
    records = forward_receiver.wait_for(arrived(cid, "r3500"), 30)

    truth = engine_lines(engine, cid)
    got = received(records, cid)
    missing = [line for line in truth if got[line] == 0]
    doubled = [line for line in truth if got[line] > 1]
    print(f"\nengine holds {len(truth)} lines; missing {len(missing)}, doubled {len(doubled)}")
    assert missing == [], f"{len(missing)} kept lines never arrived, from {missing[:3]}"
    assert doubled == [], f"{len(doubled)} lines arrived twice: {doubled[:3]} of {truth[-5:]}"
    # And before the stop, r1..r300 arrived once each.
    texts = Counter(text for (_, text), n in got.items() for _ in range(n))
    assert [i for i in range(1, 301) if texts[f"r{i}"] != 1] == []
