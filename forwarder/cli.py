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
    return run(config)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def run(config: Config) -> int:
    _setup_logging(config.service.log_level)
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        runner = asyncio.run
    try:
        return runner(_run(config))
    except KeyboardInterrupt:
        return EXIT_OK


async def _run(config: Config) -> int:
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
    all_sent = await pipeline.shutdown(config.service.shutdown_timeout.total_seconds())
    log.info(
        "stopped: delivered %s%s",
        pipeline.delivered_summary(),
        "" if all_sent else "; the rest follows on the next start",
    )
    return EXIT_FAILED if failed else EXIT_OK


def _log_status(pipeline: Pipeline) -> None:
    """SIGUSR1: one line of counts (tasks, followers, connections, buffer...)."""
    counts = pipeline.status().items()
    log.info("status: %s", " ".join(f"{k}={'?' if v is None else v}" for k, v in counts))


if __name__ == "__main__":
    sys.exit(main())
