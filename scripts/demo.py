"""The demo behind ./demo: a Docker engine, a container that logs, and `forwarder run`.

Uses $DOCKER_HOST when it answers, else starts a private dockerd (as the tests do), and
removes what it made when it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.engine import Engine  # noqa: E402

CHATTY = (
    'i=0; while :; do i=$((i+1)); echo "GET /item/$i 200"; '
    '[ $((i % 3)) -eq 0 ] && echo "warning: slow request $i" >&2; sleep 1; done'
)


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
            [str(ROOT / ".venv" / "bin" / "forwarder"), "run", "--config", "conf/demo.toml"],
            cwd=ROOT,
            env=env,
        )
        try:
            collector.wait(timeout=args.seconds)
        except subprocess.TimeoutExpired:
            collector.send_signal(signal.SIGTERM)
        except KeyboardInterrupt:
            collector.send_signal(signal.SIGINT)
        return collector.wait(timeout=30)
    finally:
        engine.remove_test_containers(everything=engine.is_private)
        engine.close()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
