"""``forwarder run``, ``forwarder check``, ``forwarder --version``.

Exit codes: 0 done, 1 failed at run time, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwarder import __version__
from forwarder.config import Config, ConfigError, load_config
from forwarder.timefmt import format_duration

if TYPE_CHECKING:
    from forwarder.pipeline import Pipeline

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

log = logging.getLogger("forwarder")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Ship Docker container logs, stats and events to Fluentd/Fluent Bit "
        "over the Forward protocol.",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "follow every container and ship its records"),
        ("check", "validate a config file and exit"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--config",
            "-c",
            type=Path,
            default=None,
            help="TOML config file (default: built-in defaults)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        from forwarder.forward.setup import check_output

        check_output(config.output)  # secret and TLS files, read now so a bad one is named
        if args.command == "run":
            config.state.check_access()  # the state dir, as the pipeline will use it
    except ConfigError as exc:
        print(f"forwarder: config error:\n{_indent(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        where = args.config or "built-in defaults"
        print(f"forwarder: {where}: ok")
        return EXIT_OK
    return run(config, args.config)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def run(config: Config, path: Path | None = None) -> int:
    from forwarder.logformat import setup_logging

    setup_logging(config.service.log_level, config.service.log_format)
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        runner = asyncio.run
    try:
        return runner(_run(config, path))
    except KeyboardInterrupt:
        return EXIT_OK


async def _run(config: Config, path: Path | None = None) -> int:
    from forwarder.pipeline import Pipeline

    try:
        pipeline = Pipeline(config)
        await pipeline.start()
    except ConfigError as exc:  # a file main() read has changed since
        print(f"forwarder: config error:\n{_indent(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ValueError) as exc:
        log.error("can't start: %s", exc)
        return EXIT_FAILED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_status, pipeline)
    service = _Service(pipeline, path)
    loop.add_signal_handler(signal.SIGHUP, service.on_sighup)
    log.info(
        "forwarder %s running: engine %s, output %s",
        __version__,
        config.docker.host,
        "stdout"
        if config.output.mode == "stdout"
        else ", ".join(s.url for s in config.output.servers),
    )
    waiter = asyncio.create_task(pipeline.wait())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failed = waiter in done and waiter.exception() is not None
    if failed:
        log.error("stopping after an internal error", exc_info=waiter.exception())
    else:
        log.info(
            "stopping: delivering what is held (up to %s)",
            format_duration(config.service.shutdown_timeout),
        )
    waiter.cancel()
    stopper.cancel()
    await service.aclose()
    all_sent = await pipeline.shutdown(config.service.shutdown_timeout.total_seconds())
    log.info(
        "stopped: delivered %s%s",
        pipeline.delivered_summary(),
        "" if all_sent else "; the rest follows on the next start",
    )
    return EXIT_FAILED if failed else EXIT_OK


class _Service:
    """The HTTP listener and reloads (SIGHUP or POST /-/reload), one at a time."""

    def __init__(self, pipeline: Pipeline, path: Path | None) -> None:
        from forwarder.listener import Listener

        self.pipeline = pipeline
        self.path = path
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        address = pipeline.config.service.http_listen
        self.listener = Listener(address, pipeline, self.reload) if address else None
        if self.listener is not None:
            self._spawn(self.listener.run(), "http listener")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Shipping goes on without it; liveness does not depend on it either.
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def reload(self) -> tuple[bool, str]:
        from forwarder.reload import reload

        async with self._lock:
            return await reload(self.pipeline, self.path)

    def on_sighup(self) -> None:
        self._spawn(self.reload(), "reload")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _log_status(pipeline: Pipeline) -> None:
    """SIGUSR1: one line of counts (tasks, followers, connections, buffer...)."""
    counts = pipeline.status().items()
    log.info("status: %s", " ".join(f"{k}={'?' if v is None else v}" for k, v in counts))


if __name__ == "__main__":
    sys.exit(main())
