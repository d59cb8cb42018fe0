"""./demo as a user runs it: logs, stats and lifecycle records as JSON lines on stdout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.harness.engine import Engine

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_prints_logs_stats_and_a_lifecycle_record(engine: Engine) -> None:
    env = dict(engine.env)
    done = subprocess.run(
        [sys.executable, "scripts/demo.py", "--seconds", "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    # The shape the README describes: tag, time as "seconds.nanoseconds", record.
    for line in lines:
        assert list(line) == ["tag", "time", "record"]
        assert re.fullmatch(r"\d+\.\d{9}", line["time"])
    tags = {line["tag"] for line in lines}
    assert {"docker.demo-web", "docker.stats.demo-web", "docker.demo-job"} <= tags
    events = [line["record"] for line in lines if line["tag"] == "docker.events.demo-job"]
    assert [e["action"] for e in events] == ["create", "start", "die"]
    assert events[-1]["exit_code"] == 3
    assert " stopped: delivered " in done.stderr
