"""Shared fixtures: a real Docker engine and real Forward receivers (see tests/harness).

- ``engine`` (session): :class:`tests.harness.engine.Engine`. Every test that uses it is marked
  ``engine`` and gets its containers removed afterwards (and the private daemon restarted if
  the test left it stopped).
- ``forward_receiver`` / ``make_forward_receiver(**knobs)``: :class:`ForwardReceiver`, started.
- ``counting_receiver``: :class:`CountingReceiver`, started.
- ``node_receiver`` / ``make_node_receiver(**options)``: :class:`NodeReceiver` (Fluent's
  FluentServer), started; tests using them are marked ``node``.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The harness is imported as ``tests.harness`` (bench/ scripts do the same), whichever way
# pytest was started, so the repository root must be importable.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.harness.collector import (  # noqa: E402
    CollectorProcess,
    collector_env,
    write_config,
)
from tests.harness.engine import Engine  # noqa: E402
from tests.harness.receivers import (  # noqa: E402
    CountingReceiver,
    ForwardReceiver,
    NodeReceiver,
    NodeReceiverError,
)

_NODE_FIXTURES = frozenset({"node_receiver", "make_node_receiver"})


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure() -> None:
    # A SIGTERM (a CI timeout, `kill`) would end Python at once, skipping every finalizer; as
    # an interrupt, pytest tears the fixtures down, so the private dockerd stops and its
    # directory goes. (dockerd also gets SIGTERM if this process dies: setpriv --pdeathsig.)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "engine" in names:
            item.add_marker(pytest.mark.engine)
        if names & _NODE_FIXTURES:
            item.add_marker(pytest.mark.node)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A running Docker engine: ``$DOCKER_HOST`` if it answers, else a private dockerd that
    is stopped at the end of the session."""
    started = Engine.from_environment()
    yield started
    started.close()


@pytest.fixture(autouse=True)
def _engine_cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used ``engine``: restart the private daemon if the test left it
    stopped, and remove the containers (all of them on the private engine, else the ones
    the harness labelled or started)."""
    if "engine" not in request.fixturenames:
        yield
        return
    used: Engine = request.getfixturevalue("engine")
    yield
    if used.is_private and not used.daemon_running:
        used.start_daemon()
    used.remove_test_containers(everything=used.is_private)


@pytest.fixture
def make_forward_receiver() -> Iterator[Callable[..., ForwardReceiver]]:
    """``make_forward_receiver(ack=False, ...)``: a started ForwardReceiver, stopped after
    the test. Takes :class:`ForwardReceiver`'s keyword arguments."""
    made: list[ForwardReceiver] = []

    def make(**knobs: Any) -> ForwardReceiver:
        receiver = ForwardReceiver(**knobs).start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def forward_receiver(make_forward_receiver: Callable[..., ForwardReceiver]) -> ForwardReceiver:
    """A started ForwardReceiver with default knobs (acks everything)."""
    return make_forward_receiver()


@pytest.fixture
def counting_receiver() -> Iterator[CountingReceiver]:
    receiver = CountingReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def make_node_receiver() -> Iterator[Callable[..., NodeReceiver]]:
    """``make_node_receiver(security=..., tls=..., ack=...)``: a started NodeReceiver,
    stopped after the test. Fails (not skips) if node or @fluent-org/logger is missing."""
    try:
        NodeReceiver.check_installed()
    except NodeReceiverError as exc:
        pytest.fail(str(exc), pytrace=False)
    made: list[NodeReceiver] = []

    def make(**options: Any) -> NodeReceiver:
        receiver = NodeReceiver(**options)
        made.append(receiver)
        return receiver.start()

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def node_receiver(make_node_receiver: Callable[..., NodeReceiver]) -> NodeReceiver:
    """A started NodeReceiver without security, TLS or ack changes."""
    return make_node_receiver()


@pytest.fixture
def make_collector(
    engine: Engine, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., CollectorProcess]]:
    """``make_collector(server, start=True, **sections)``: `forwarder run` as a process on
    the test engine, shipping to ``server``, stopped after the test. Its config is a quick
    base (head of every log, short flushes and retries, state in tmp_path, stats off),
    updated by the test module's ``COLLECTOR_DEFAULTS`` and then by ``sections``."""
    made: list[CollectorProcess] = []
    module_defaults: dict[str, dict[str, Any]] = getattr(request.module, "COLLECTOR_DEFAULTS", {})

    def make(server: str, *, start: bool = True, **sections: dict[str, Any]) -> CollectorProcess:
        config: dict[str, dict[str, Any]] = {
            "docker": {"host": engine.host, "read_from": "head"},
            "output": {
                "servers": [server],
                "flush_interval": "200ms",
                "retry_wait": "100ms",
                "retry_max_wait": "1s",
            },
            "state": {"dir": str(tmp_path / "state")},
            "stats": {"interval": "0s"},
        }
        for overrides in (module_defaults, sections):
            for name, keys in overrides.items():
                config.setdefault(name, {}).update(keys)
        path = write_config(tmp_path / f"forwarder-{len(made)}.toml", config)
        collector = CollectorProcess(path, collector_env(engine.env), tmp_path)
        made.append(collector)
        return collector.start() if start else collector

    yield make
    for collector in made:
        collector.stop()
