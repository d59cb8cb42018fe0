"""Reload: SIGHUP or ``POST /-/reload`` reads the config file again.

An invalid file is rejected with the messages ``forwarder check`` gives, and the running
config stays. A valid one is applied in place where :data:`RELOADABLE` says so: the log
level and format, and the Forward output (servers, TLS files, handshake secrets, timeouts):
the running output is cancelled, which hands every chunk it held back to the buffer, and a
new one takes them from there, so nothing is lost (a chunk whose ack was in flight may be
sent twice, as after any failure). Every other key keeps its running value until the next
start, and a change to one is named in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from forwarder import logformat
from forwarder.config import Config, ConfigError, load_config
from forwarder.forward.setup import check_output

if TYPE_CHECKING:
    from forwarder.pipeline import Pipeline

log = logging.getLogger(__name__)

RELOADABLE: dict[str, tuple[str, ...]] = {
    "service": ("log_level", "log_format", "shutdown_timeout"),
    "output": (
        "servers",
        "tls",
        "ack_timeout",
        "connect_timeout",
        "retry_wait",
        "retry_max_wait",
        "heartbeat_interval",
        "self_hostname",
        "shared_key",
        "shared_key_file",
        "username",
        "password",
        "password_file",
    ),
}
"""The keys a reload applies in place, by section; every other key needs a restart."""


def changed_keys(old: Config, new: Config) -> list[str]:
    """``section.key`` of every key whose value differs."""
    keys = []
    for section in type(old).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if not isinstance(before, BaseModel):  # a list of tables, such as [[multiline]]
            if before != after:
                keys.append(section)
            continue
        for key in type(before).model_fields:
            if getattr(before, key) != getattr(after, key):
                keys.append(f"{section}.{key}")
    return keys


def merge(old: Config, new: Config) -> Config:
    """The config that runs after the reload: ``new``'s reloadable keys, ``old``'s others."""
    update: dict[str, Any] = {}
    for section, keys in RELOADABLE.items():
        running = getattr(old, section)
        update[section] = running.model_copy(
            update={key: getattr(getattr(new, section), key) for key in keys}
        )
    return old.model_copy(update=update)


def is_reloadable(key: str) -> bool:
    section, _, name = key.partition(".")
    return name in RELOADABLE.get(section, ())


def read(path: Path | None) -> Config:
    """Load and check the file as ``forwarder check`` does; raises ConfigError."""
    config = load_config(path)
    check_output(config.output)
    return config


async def reload(pipeline: Pipeline, path: Path | None) -> tuple[bool, str]:
    """Read ``path`` again and apply it; returns (applied, what happened), also logged."""
    where = path or "built-in defaults"
    try:
        new = read(path)
    except ConfigError as exc:
        message = f"reload: {where}: rejected, the running config stays:\n{_indent(str(exc))}"
        log.error(message, extra={"reason": str(exc)})
        return False, message
    old = pipeline.config
    changed = changed_keys(old, new)
    later = [key for key in changed if not is_reloadable(key)]
    running = merge(old, new)
    logformat.apply(running.service.log_level, running.service.log_format)
    output_keys = [key for key in changed if key.startswith("output.") and is_reloadable(key)]
    uses_tls = any(s.endpoint.scheme == "tls" for s in running.output.servers)
    new_output = running.output.mode == "forward" and (output_keys or uses_tls)
    pipeline.config = running
    if new_output:
        await pipeline.swap_output(pipeline.forward_output(running))
    applied = [key for key in changed if is_reloadable(key)]
    if uses_tls and new_output:
        applied.append("the TLS files, read again")
    message = f"reload: {where}: " + (
        f"applied {', '.join(applied)}" if applied else "nothing to change in place"
    )
    if later:
        message += f"; these keep their running value until the next start: {', '.join(later)}"
    log.log(logging.WARNING if later else logging.INFO, message)
    return True, message


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
