"""The daemon's container events as lifecycle records (sans-I/O).

An event of ``GET /events`` looks like this (Docker Engine 20.10; ``tests/data/events``)::

    {"status": "die", "id": "4ef2…", "from": "busybox", "Type": "container", "Action": "die",
     "Actor": {"ID": "4ef2…", "Attributes": {"exitCode": "3", "image": "busybox",
                                              "name": "ev-exit3", "app": "web"}},
     "scope": "local", "time": 1795592455, "timeNano": 1795592455038831506}

``Attributes`` holds the container's labels beside the engine's own keys (``name`` without
the leading ``/``, ``image``, ``exitCode`` on die, ``signal`` on kill). A health check's
Action carries its result: ``"health_status: healthy"``. Other actions (``exec_*``,
``attach``, ``resize``, ``rename``, ``top``, ``commit``, ``copy``, ``export``, ``update``...)
are not shipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast, get_args

from forwarder.records import ContainerInfo, LifecycleAction, LifecycleEvent

__all__ = ["LIFECYCLE_ACTIONS", "event_attributes", "event_container", "lifecycle_record"]

LIFECYCLE_ACTIONS: frozenset[str] = frozenset(get_args(LifecycleAction))

_ID_RE = re.compile(r"[0-9a-f]{64}")
# Attributes the engine adds itself; every other attribute of a container event is a label.
_ENGINE_ATTRIBUTES = frozenset({"name", "image", "exitCode", "signal", "execID", "oldName"})


def event_attributes(event: Mapping[str, Any]) -> Mapping[str, str]:
    """``Actor.Attributes`` of an event; empty when absent or malformed."""
    actor = event.get("Actor")
    attributes = actor.get("Attributes") if isinstance(actor, Mapping) else None
    return attributes if isinstance(attributes, Mapping) else {}


def _container_id(event: Mapping[str, Any]) -> str | None:
    actor = event.get("Actor")
    cid = event.get("id") or (actor.get("ID") if isinstance(actor, Mapping) else None)
    return cid if isinstance(cid, str) and _ID_RE.fullmatch(cid) else None


def _action(event: Mapping[str, Any]) -> tuple[str, str | None]:
    """The action and, for ``"health_status: healthy"``, the status after the colon."""
    action = event.get("Action") or event.get("status") or ""
    if not isinstance(action, str):
        return "", None
    name, colon, detail = action.partition(":")
    return name.strip(), (detail.strip() or None) if colon else None


def _int(value: Any) -> int | None:
    """An engine attribute (a decimal string) as an int; None when absent or not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _from_event(event: Mapping[str, Any], cid: str) -> ContainerInfo:
    attributes = event_attributes(event)
    name = attributes.get("name")
    image = attributes.get("image") or event.get("from")
    return ContainerInfo(
        id=cid,
        name="/" + name.lstrip("/")
        if isinstance(name, str) and name.strip("/")
        else "/" + cid[:12],
        image=image if isinstance(image, str) else "",
        labels={
            k: v
            for k, v in attributes.items()
            if k not in _ENGINE_ATTRIBUTES and isinstance(v, str)
        },
    )


def event_container(
    event: Mapping[str, Any], container: ContainerInfo | None
) -> ContainerInfo | None:
    """``container`` if known, else one built from the event's attributes (the container may
    be gone already, as on ``destroy``); None for an event that names no container."""
    if container is not None:
        return container
    cid = _container_id(event)
    if cid is None or event.get("Type", "container") != "container":
        return None
    return _from_event(event, cid)


def lifecycle_record(
    event: Mapping[str, Any], container: ContainerInfo | None
) -> tuple[int, LifecycleEvent] | None:
    """``(timeNano, record)`` for a container event worth shipping, else None.

    ``container`` is what discovery knows of it (None when it does not, or no longer does);
    the event's own attributes stand in for it.
    """
    if event.get("Type", "container") != "container":
        return None
    cid = _container_id(event)
    action, detail = _action(event)
    if cid is None or action not in LIFECYCLE_ACTIONS:
        return None
    if container is not None and container.id != cid:
        raise ValueError(f"event of container {cid!r} given with {container.id!r}")
    ts_ns = _int(event.get("timeNano"))
    if ts_ns is None:
        seconds = _int(event.get("time"))
        if seconds is None:
            return None
        ts_ns = seconds * 1_000_000_000
    info = container if container is not None else _from_event(event, cid)
    attributes = event_attributes(event)
    record = LifecycleEvent(
        action=cast(LifecycleAction, action),
        container_id=cid,
        container_name=info.name,
        image=info.image,
        exit_code=_int(attributes.get("exitCode")) if action == "die" else None,
        signal=_int(attributes.get("signal")) if action == "kill" else None,
        health_status=detail if action == "health_status" else None,
    )
    return ts_ns, record
