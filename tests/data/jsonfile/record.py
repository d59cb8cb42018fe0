"""Record json-file logs written by a real engine into this directory (see README.md).

Run from the repository root: ``python -m tests.data.jsonfile.record``. Starts a private
dockerd (tests/harness), runs the containers below, and copies their ``*-json.log*`` files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.harness.engine import Engine

HERE = Path(__file__).parent

MIXED = (
    # stdout and stderr interleaved, a 40,000-byte line (cut by the engine at 16 KiB),
    # invalid UTF-8, control bytes and HTML characters, an unterminated tail at exit.
    "echo first; echo err-1 >&2; "
    "head -c 40000 /dev/zero | tr '\\0' a; echo; "
    "echo err-2 >&2; "
    "printf 'bad \\377\\376 utf8\\n'; printf 'ctl \\001\\t<&>\"\\\\ \\342\\200\\250 end\\n'; "
    "printf 'tail-without-newline'"
)
ROTATED = (
    "i=0; while [ $i -lt 400 ]; do i=$((i+1)); "
    "echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
)


def main() -> None:
    engine = Engine.start_private()
    try:
        runs = {
            "mixed": (
                MIXED,
                [
                    "--label",
                    "team=a",
                    "--log-opt",
                    "labels=team",
                    "-e",
                    "MODE=x",
                    "--log-opt",
                    "env=MODE",
                ],
                False,
            ),
            "tty": ("echo tty-line; printf 'two\\n'", [], True),
            "rotated": (ROTATED, ["--log-opt", "max-size=10k", "--log-opt", "max-file=3"], False),
            "compressed": (
                ROTATED,
                [
                    "--log-opt",
                    "max-size=10k",
                    "--log-opt",
                    "max-file=3",
                    "--log-opt",
                    "compress=true",
                ],
                False,
            ),
        }
        for name, (script, options, tty) in runs.items():
            cid = engine.run("sh", "-c", script, options=options, tty=tty)
            engine.wait_exited(cid)
            log_path = Path(engine.inspect(cid)["LogPath"])
            engine.docker("stop", cid)  # closes the log file (and finishes compression)
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for f in sorted(log_path.parent.glob(log_path.name + "*")):
                shutil.copyfile(f, target / f.name.replace(cid, "c"))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
