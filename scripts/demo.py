"""The demo behind ./demo: a Docker engine, a container that logs, and `forwarder run`;
once forwarder runs, a short job container starts and fails, so that its lifecycle records
(create, start, die with the exit code) show beside the logs and the stats.

Uses $DOCKER_HOST when it answers, else starts a private dockerd (as the tests do), and
removes what it made when it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.engine import Engine  # noqa: E402

CHATTY = (
    'i=0; while :; do i=$((i+1)); echo "GET /item/$i 200"; '
    '[ $((i % 3)) -eq 0 ] && echo "warning: slow request $i" >&2; sleep 1; done'
)
# Started once forwarder runs, so that its lifecycle shows: create, start, and die with the
# exit code.
JOB = 'echo "job: migrating"; sleep 2; echo "job: failed" >&2; exit 3'


def _relay(stream: IO[bytes], running: threading.Event) -> None:
    """Copy forwarder's own log to our stderr; note when it says it is running."""
    for line in stream:
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
        if b" running: " in line:
            running.set()


def main() -> int:
    parser = argparse.ArgumentParser(prog="./demo")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = parser.parse_args()
    engine = Engine.from_environment()
    try:
        cid = engine.run("sh", "-c", CHATTY, name="demo-web")
        print(
            f"# engine {engine.host}; container demo-web ({cid[:12]}) logs every second",
            file=sys.stderr,
        )
        print("# forwarder run --config conf/demo.toml (Ctrl-C stops it)", file=sys.stderr)
        env = dict(engine.env)
        collector = subprocess.Popen(
            [sys.executable, "-m", "forwarder.cli", "run", "--config", "conf/demo.toml"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
        )
        assert collector.stderr is not None
        running = threading.Event()
        relay = threading.Thread(target=_relay, args=(collector.stderr, running), daemon=True)
        relay.start()
        try:
            if running.wait(timeout=30) and collector.poll() is None:
                job = engine.run("sh", "-c", JOB, name="demo-job")
                print(
                    f"# container demo-job ({job[:12]}) started: it exits with code 3 in 2s",
                    file=sys.stderr,
                )
            collector.wait(timeout=args.seconds)
        except subprocess.TimeoutExpired:
            collector.send_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            collector.send_signal(signal.SIGINT)
        code = collector.wait(timeout=30)
        relay.join(timeout=5)
        return code
    finally:
        engine.remove_test_containers(everything=engine.is_private)
        engine.close()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
