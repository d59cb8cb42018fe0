"""What `check` accepts, `run` can use: every constraint the pipeline relies on is in the config
model, values from the file have strict types, and absurd values are refused with a sentence
that names the key, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from forwarder import cli
from forwarder.config import Bounds, Config, ConfigError, config_from_dict, load_config


def _never_run(_config: Config) -> int:
    raise AssertionError("the pipeline started on a config that should have been refused")


def forwarder(monkeypatch: pytest.MonkeyPatch, command: str, path: Path | str) -> tuple[int, str]:
    """``forwarder <command> --config <path>`` in this process: its exit code and stderr."""
    monkeypatch.setattr(cli, "run", _never_run)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([command, "--config", str(path)])
    return code, stderr.getvalue()


def toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


# --- item: check and run refuse the same configs --------------------------------------------

REFUSED: list[tuple[dict[str, dict[str, Any]], str]] = [
    ({"output": {"chunk_limit": 0}}, "output.chunk_limit: must be from 1KiB to 64MiB"),
    ({"output": {"chunk_limit": "999999999999GiB"}}, "output.chunk_limit: must be from"),
    ({"output": {"flush_interval": 0}}, "output.flush_interval: must be from 1ms to 1h"),
    ({"output": {"flush_interval": "0s"}}, "output.flush_interval: must be from 1ms"),
    ({"output": {"ack_timeout": "0ms"}}, "output.ack_timeout: must be from 1ms"),
    ({"output": {"connect_timeout": 0}}, "output.connect_timeout: must be from 1ms"),
    ({"output": {"retry_wait": 0}}, "output.retry_wait: must be from 1ms"),
    ({"output": {"heartbeat_interval": "2h"}}, "output.heartbeat_interval: must be from"),
    ({"output": {"retry_wait": "10s", "retry_max_wait": "5s"}}, "retry_max_wait is shorter"),
    (
        {"output": {"buffer_limit": "512KiB", "chunk_limit": "1MiB"}},
        "output: buffer_limit (524288 bytes) is smaller than chunk_limit (1048576 bytes)",
    ),
    ({"output": {"buffer_limit": 1e23}}, "output.buffer_limit"),
    ({"output": {"buffer_limit": 10**23}}, "output.buffer_limit: must be from 1KiB to 16GiB"),
    (
        {"output": {"chunk_limit": "1MiB"}, "buffer": {"max_bytes": "1MiB"}},
        "buffer.max_bytes (1048576 bytes) must be more than twice output.chunk_limit",
    ),
    ({"buffer": {"max_bytes": 0}}, "buffer.max_bytes: must be from 64KiB"),
    ({"docker": {"max_line_bytes": 0}}, "docker.max_line_bytes: must be from 1KiB to 64MiB"),
    ({"stats": {"interval": "500ms"}}, 'stats.interval: must be from 1s to 24h (or "0s"'),
    ({"stats": {"interval": "2d"}}, "stats.interval"),
    ({"service": {"shutdown_timeout": "2h"}}, "service.shutdown_timeout: must be from 0s"),
    (
        {"output": {"servers": ["tcp://agg:99999"]}},
        "output.servers.0.url: the port must be a number from 1 to 65535",
    ),
    (
        {"output": {"servers": ["tls://agg:0"]}},
        "output.servers.0.url: the port must be a number from 1 to 65535",
    ),
    (
        {"output": {"servers": ["tcp://agg:http"]}},
        "output.servers.0.url: the port must be a number from 1 to 65535",
    ),
    ({"docker": {"host": "tcp://engine:70000"}}, "docker.host: the port must be a number"),
]


@pytest.mark.parametrize(("sections", "expected"), REFUSED)
@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_refuse_what_run_could_not_use(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    sections: dict[str, dict[str, Any]],
    expected: str,
) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(toml(sections))
    code, stderr = forwarder(monkeypatch, command, path)
    assert code == 2, stderr
    assert expected in stderr
    assert "Traceback" not in stderr


def test_the_bounds_are_inclusive_and_off_is_allowed() -> None:
    cfg = config_from_dict(
        {
            "output": {"flush_interval": "1ms", "chunk_limit": "64MiB", "buffer_limit": "64MiB"},
            "docker": {"max_line_bytes": "1KiB"},
            "stats": {"interval": "0s"},
            "buffer": {"max_bytes": "1024GiB"},
            "service": {"shutdown_timeout": 0},
        },
        env={},
    )
    assert cfg.output.flush_interval == timedelta(milliseconds=1)
    assert cfg.stats.interval == timedelta(0)
    assert cfg.buffer.max_bytes == 1024 * 1024**3
    # The disk buffer's floor depends on chunk_limit only when there is a disk buffer.
    cfg = config_from_dict(
        {"output": {"chunk_limit": "64MiB"}, "buffer": {"mode": "memory", "max_bytes": "1MiB"}},
        env={},
    )
    assert cfg.buffer.max_bytes == 1024**2


def _bounds_of(model: type[Any], prefix: str = "") -> list[tuple[str, str, Bounds]]:
    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            found += _bounds_of(annotation, key)
        for meta in field.metadata:
            bounds = getattr(meta, "func", None)
            if isinstance(bounds, Bounds):
                found.append((key, field.description or "", bounds))
    return found


def test_every_duration_and_size_states_its_bounds_in_the_docs() -> None:
    found = _bounds_of(Config)
    assert {key for key, _, _ in found} >= {
        "docker.max_line_bytes",
        "output.flush_interval",
        "output.chunk_limit",
        "output.ack_timeout",
        "output.connect_timeout",
        "output.buffer_limit",
        "output.retry_wait",
        "output.retry_max_wait",
        "output.heartbeat_interval",
        "stats.interval",
        "buffer.max_bytes",
        "service.shutdown_timeout",
    }
    for key, description, bounds in found:
        assert bounds.text in description, key


# --- item: run never shows a traceback for a bad environment --------------------------------


def test_run_refuses_a_state_dir_it_cant_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    path = tmp_path / "forwarder.toml"
    path.write_text(toml({"state": {"dir": str(in_the_way / "state")}}))
    code, stderr = forwarder(monkeypatch, "run", path)
    assert code == 2, stderr
    assert f"state.dir: can't create {in_the_way / 'state'}: Not a directory" in stderr
    # check validates the file; the state dir is the host's business, looked at by run.
    assert forwarder(monkeypatch, "check", path)[0] == 0


def test_run_refuses_a_missing_ca_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "forwarder.toml"
    missing = tmp_path / "nope.pem"
    path.write_text(
        toml(
            {
                "output": {"servers": ["tls://agg:24284"]},
                "output.tls": {"ca_file": str(missing)},
                "state": {"dir": str(tmp_path / "state")},
            }
        )
    )
    code, stderr = forwarder(monkeypatch, "run", path)
    assert code == 2
    assert f"output.tls.ca_file: can't read {missing}: No such file or directory" in stderr


def test_run_in_a_subprocess_shows_a_sentence_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(toml({"output": {"chunk_limit": 0}, "state": {"dir": str(tmp_path)}}))
    result = subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "output.chunk_limit: must be from 1KiB to 64MiB (got 0)" in result.stderr
    assert "Traceback" not in result.stderr


# --- item: strict types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"output": {"require_ack": "no"}}, "output.require_ack: Input should be a valid boolean"),
        ({"docker": {"exclude_self": 0}}, "docker.exclude_self: Input should be a valid boolean"),
        ({"output": {"tls": {"verify": "false"}}}, "output.tls.verify"),
        (
            {"output": {"servers": [{"url": "tcp://a:1", "weight": "60"}]}},
            "output.servers.0.weight: Input should be a valid integer",
        ),
        ({"output": {"servers": [{"url": "tcp://a:1", "weight": 1.0}]}}, "servers.0.weight"),
        ({"output": {"servers": [{"url": "tcp://a:1", "standby": 1}]}}, "servers.0.standby"),
        ({"output": {"mode": 1}}, "output.mode"),
        ({"output": {"self_hostname": 5}}, "output.self_hostname"),
        ({"tags": {"logs": 7}}, "tags.logs"),
        ({"state": {"dir": ""}}, "state.dir: the path is empty"),
        ({"state": {"dir": 5}}, "state.dir: expected a path, as a string"),
        ({"output": {"shared_key_file": ""}}, "output.shared_key_file: the path is empty"),
        ({"output": {"tls": {"ca_file": " "}}}, "output.tls.ca_file: the path is empty"),
        ({"output": {"chunk_limit": 1.5}}, "output.chunk_limit"),
        ({"output": {"flush_interval": True}}, "output.flush_interval"),
    ],
)
def test_values_from_the_file_have_strict_types(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, env={})
    assert expected in str(info.value)


def test_durations_and_sizes_keep_their_string_and_number_forms(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(
        '[output]\nflush_interval = 1.5\nack_timeout = 2\nconnect_timeout = "250ms"\n'
        'chunk_limit = 65536\nbuffer_limit = "8MiB"\n[state]\ndir = "relative/state"\n'
    )
    cfg = load_config(path, env={})
    assert cfg.output.flush_interval == timedelta(seconds=1.5)
    assert cfg.output.ack_timeout == timedelta(seconds=2)
    assert cfg.output.connect_timeout == timedelta(milliseconds=250)
    assert (cfg.output.chunk_limit, cfg.output.buffer_limit) == (65536, 8 * 1024**2)
    assert cfg.state.dir == Path("relative/state")


# --- item: values that overflowed, files that recursed -------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('ack_timeout = "99999999999h"', "output.ack_timeout: far too long a duration"),
        ("ack_timeout = 99999999999999999999", "output.ack_timeout: far too long a duration"),
        ("ack_timeout = inf", "output.ack_timeout: far too long a duration"),
        ("ack_timeout = 1e400", "output.ack_timeout: far too long a duration"),
        ("ack_timeout = nan", "output.ack_timeout: nan is not a number of seconds"),
        ("ack_timeout = -1", "output.ack_timeout: a duration can't be negative"),
        (f'chunk_limit = "{"9" * 400}"', "output.chunk_limit: far too large a size"),
        (f'chunk_limit = "{"9" * 5000}KiB"', "output.chunk_limit: far too large a size"),
    ],
)
def test_absurd_numbers_are_refused_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, expected: str
) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text(f"[output]\n{line}\n")
    for command in ("check", "run"):
        code, stderr = forwarder(monkeypatch, command, path)
        assert code == 2, stderr
        assert expected in stderr
        assert "Traceback" not in stderr


def test_a_file_nested_5000_deep_is_refused_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "forwarder.toml"
    path.write_text("[output]\nservers = " + "[" * 5000 + "]" * 5000 + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "forwarder.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"{path}: arrays or tables nested far too deeply" in result.stderr
    assert "Traceback" not in result.stderr
