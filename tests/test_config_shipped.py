"""conf/forwarder.toml documents every default and changes nothing: loading it gives the same
Config as no file at all, whatever the environment says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from forwarder.config import Config, load_config

SHIPPED = Path(__file__).resolve().parent.parent / "conf" / "forwarder.toml"


@pytest.mark.parametrize("docker_host", [None, "tcp://engine.example:2375"])
def test_the_shipped_config_is_the_same_as_no_config(
    monkeypatch: pytest.MonkeyPatch, docker_host: str | None
) -> None:
    if docker_host is None:
        monkeypatch.delenv("DOCKER_HOST", raising=False)
    else:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
    shipped = load_config(SHIPPED, env={})
    assert shipped == load_config(None, env={})
    if docker_host is not None:
        assert shipped.docker.host == docker_host


def _keys_by_section(text: str) -> dict[str, set[str]]:
    """Each [section]'s keys, set or commented out (``# key = ...``)."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\s*\[([a-z_.]+)\].*", line)
        if header:
            section = header[1]
            continue
        key = re.match(r"\s*(?:#\s?)?([a-z_]+) = ", line)
        if key:
            keys.setdefault(section, set()).add(key[1])
    return keys


def _model_keys(model: type[BaseModel], prefix: str) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.update(_model_keys(sub, f"{prefix}.{name}" if prefix else name))
        else:
            keys.setdefault(prefix, set()).add(name)
    return keys


def test_the_shipped_config_writes_out_every_key() -> None:
    written = _keys_by_section(SHIPPED.read_text())
    for section, names in _model_keys(Config, "").items():
        missing = names - written.get(section, set())
        assert not missing, f"[{section}] lacks {sorted(missing)} in {SHIPPED.name}"
