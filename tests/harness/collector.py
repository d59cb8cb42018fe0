"""Runs ``forwarder run`` as a real process, the way a user does, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.polling import wait_until


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"can't write {value!r} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class CollectorProcess:
    """``forwarder run --config PATH`` in the background, with its stderr in a file."""

    def __init__(self, config_path: Path, env: dict[str, str], workdir: Path) -> None:
        self.config_path = config_path
        self.env = env
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"collector-{self.runs}.log"

    def start(self) -> CollectorProcess:
        self.runs += 1
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder.cli", "run", "--config", str(self.config_path)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(
            lambda: "running:" in self.log() or self.proc is None or self.proc.poll() is not None,
            timeout=30,
            what="the collector to start",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"the collector exited at once:\n{self.log()}")
        return self

    def log(self) -> str:
        """Everything this run has logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "".join(
            (self.workdir / f"collector-{n}.log").read_text(errors="replace")
            for n in range(1, self.runs + 1)
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; returns the exit code and how long the exit took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()

    def status(self) -> dict[str, int | None]:
        """Send SIGUSR1 and parse the status line the collector logs (None: not known)."""
        before = self.log().count(" status: ")
        os.kill(self.pid, signal.SIGUSR1)

        def logged() -> str | None:
            lines = [line for line in self.log().splitlines() if " status: " in line]
            return lines[-1] if len(lines) > before else None

        line = wait_until(logged, timeout=10, what="the status line")
        counts: dict[str, int | None] = {}
        for item in line.split(" status: ", 1)[1].split():
            key, _, value = item.partition("=")
            counts[key] = None if value == "?" else int(value)
        return counts

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def collector_env(engine_env: dict[str, str]) -> dict[str, str]:
    env = dict(engine_env)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
