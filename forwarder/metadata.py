"""Extra keys on log records: Docker's fluentd driver's labels/env, and richer keys.

:func:`record_extra` gives a container's extra keys once; the chunk assembler packs them once
per container (:func:`forwarder.forward.protocol.log_head`), so a line costs no more with them.

The driver keys follow moby's ``daemon/logger/loginfo.go`` (``Info.ExtraAttributes``), which
the fluentd driver calls with no key modifier and then sets over its four keys:

- ``labels``: each listed label the container has, under its own key;
- ``labels_regex``: each label whose key the regular expression finds (searches);
- ``env``: each listed variable of the container's environment (``Config.Env``; a variable
  given twice keeps its last value), under its own name; a variable wins over a label of the
  same key, since the driver adds them after the labels;
- ``env_regex``: each variable whose name the regular expression finds.

A key equal to one of the four (``container_id``, ``container_name``, ``source``, ``log``)
replaces that key's value, as the driver's does. The richer keys (``[records] extra``) are
forwarder's own; the driver keys are set over them.
"""

from __future__ import annotations

import re
from typing import Any

from forwarder.config import RecordsConfig
from forwarder.records import ContainerInfo
from forwarder.selection import COMPOSE_PROJECT, COMPOSE_SERVICE


def environment(container: ContainerInfo) -> dict[str, str]:
    """``Config.Env`` as a mapping: the last of a name wins; an entry without ``=`` is left out."""
    env: dict[str, str] = {}
    for entry in container.env:
        name, eq, value = entry.partition("=")
        if eq:
            env[name] = value
    return env


def driver_extra(container: ContainerInfo, config: RecordsConfig) -> dict[str, str]:
    """The keys Docker's fluentd driver adds for ``--log-opt labels= labels-regex= env=
    env-regex=`` set as in ``config``."""
    extra: dict[str, str] = {}
    labels = container.labels
    for key in config.labels:
        if key in labels:
            extra[key] = labels[key]
    if config.labels_regex:
        pattern = re.compile(config.labels_regex)
        for key, value in labels.items():
            if pattern.search(key):
                extra[key] = value
    if config.env or config.env_regex:
        env = environment(container)
        for key in config.env:
            if key in env:
                extra[key] = env[key]
        if config.env_regex:
            pattern = re.compile(config.env_regex)
            for key, value in env.items():
                if pattern.search(key):
                    extra[key] = value
    return extra


def richer(container: ContainerInfo, host: str) -> dict[str, str]:
    """Every richer key there is for ``container`` (a compose key only with its label)."""
    keys = {"image": container.image, "image_id": container.image_id}
    if COMPOSE_PROJECT in container.labels:
        keys["compose_project"] = container.labels[COMPOSE_PROJECT]
    if COMPOSE_SERVICE in container.labels:
        keys["compose_service"] = container.labels[COMPOSE_SERVICE]
    if host:
        keys["host"] = host
    return keys


def record_extra(container: ContainerInfo, config: RecordsConfig, host: str = "") -> dict[str, Any]:
    """All the keys ``config`` adds to ``container``'s log records (empty by default)."""
    extra: dict[str, Any] = {}
    if config.extra:
        keys = richer(container, host)
        for name in config.extra:
            if name == "docker":
                extra["docker"] = keys
            elif name in keys:
                extra[name] = keys[name]
    extra.update(driver_extra(container, config))
    return extra


def needs_host(config: RecordsConfig) -> bool:
    return "host" in config.extra or "docker" in config.extra
