"""The operability pieces without an engine: the listen key, JSON log lines, reload's merge,
the metric table, and a listener whose address is taken."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import ConfigError, config_from_dict
from forwarder.listener import Listener
from forwarder.logformat import JsonFormatter
from forwarder.metrics import METRICS, metrics_reference
from forwarder.reload import changed_keys, is_reloadable, merge
from tests.helpers import run, until


@pytest.mark.parametrize("value", ["", "127.0.0.1:24231", "0.0.0.0:1", "[::1]:9000", ":8080"])
def test_http_listen_takes_host_port_or_empty(value: str) -> None:
    assert config_from_dict({"service": {"http_listen": value}}).service.http_listen == value


@pytest.mark.parametrize("value", ["24231", "host:", "host:0", "host:70000", "::1:80x", "[::1:9"])
def test_http_listen_rejects_the_rest_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"service\.http_listen: "):
        config_from_dict({"service": {"http_listen": value}})


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("forwarder.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_structured_fields_as_keys() -> None:
    line = json.loads(
        JsonFormatter().format(_record(server="tcp://a:1", reason='say "no"\nnow', other=1))
    )
    assert line.pop("time").endswith("+00:00")
    assert line == {
        "level": "warning",
        "logger": "forwarder.x",
        "message": "a b",
        "server": "tcp://a:1",
        "reason": 'say "no"\nnow',
    }


def test_json_lines_carry_the_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = _record()
        record.exc_info = sys.exc_info()
    text = JsonFormatter().format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]


def test_reload_applies_servers_and_level_and_keeps_the_rest() -> None:
    old = config_from_dict({"output": {"servers": ["tcp://a:1"]}, "state": {"dir": "/tmp/a"}})
    new = config_from_dict(
        {
            "output": {"servers": ["tcp://b:2"], "chunk_limit": "2MiB"},
            "state": {"dir": "/tmp/b"},
            "service": {"log_level": "debug", "http_listen": ""},
        }
    )
    changed = changed_keys(old, new)
    assert changed == [
        "output.servers",
        "output.chunk_limit",
        "state.dir",
        "service.log_level",
        "service.http_listen",
    ]
    assert [key for key in changed if not is_reloadable(key)] == [
        "output.chunk_limit",
        "state.dir",
        "service.http_listen",
    ]
    running = merge(old, new)
    assert [s.url for s in running.output.servers] == ["tcp://b:2"]
    assert running.service.log_level == "debug"
    assert running.output.chunk_limit == old.output.chunk_limit
    assert running.state.dir == old.state.dir
    assert running.service.http_listen == old.service.http_listen


def test_the_metric_table_lists_every_metric_once() -> None:
    table = metrics_reference()
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    for name in names:
        assert table.count(f"`{name}`") == 1
    for contract in (
        "forwarder_records_read_total",
        "forwarder_records_delivered_total",
        "forwarder_chunks_retried_total",
        "forwarder_buffer_bytes",
        "forwarder_server_up",
        "forwarder_delivery_lag_seconds",
    ):
        assert contract in names


def test_a_taken_address_is_logged_naming_the_key_and_bound_once_free(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("forwarder.listener.BIND_RETRY_S", 0.01)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"

    async def scenario() -> None:
        listener = Listener(address, pipeline=None, reload=None)  # type: ignore[arg-type]
        task = asyncio.create_task(listener.run())
        await until(lambda: "http_listen" in caplog.text, what="the error")
        assert not listener.bound.is_set()
        taken.close()
        await until(listener.bound.is_set, what="the bind")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="forwarder.listener"):
        run(scenario())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once, not at every retry
    assert "[service] http_listen" in errors[0].getMessage()
    assert address in errors[0].getMessage()
    assert f"listening on {address} now" in caplog.text


def test_every_metric_the_readme_panels_name_is_defined() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- promql:begin -->")[1].split("<!-- promql:end -->")[0]
    named = set(re.findall(r"\bforwarder_[a-z_]+", block))
    defined = {m.name for m in METRICS}
    histograms = {m.name for m in METRICS if m.type == "histogram"}
    for name in named:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in defined or base in histograms, f"{name} is not in forwarder.metrics"
    assert len(named) >= 10
