"""A CRI log's metadata from its path: the ``kubernetes`` map, the tag and the record.

The names are those of ``fluent-plugin-kubernetes_metadata_filter`` (``namespace_name``,
``pod_name``, ``pod_id``, ``container_name``, ``container_id``) plus ``restart_count``, and
the record's keys are those of fluentd-kubernetes-daemonset's CRI parser (the regular
expression its README gives for containerd and CRI-O,
``^(?<time>.+) (?<stream>stdout|stderr)( (?<logtag>.))? (?<log>.*)$``): ``stream``,
``logtag`` and ``log``, the time from the file as the entry's time. A line joined from
``P`` pieces is whole, so its ``logtag`` is ``F``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from forwarder.kubernetes.pods import PodLog
from forwarder.records import LogLine

DEFAULT_TAG = (
    "kubernetes.var.log.containers.{{.PodName}}_{{.Namespace}}_{{.ContainerName}}-"
    "{{.ContainerID}}.log"
)
"""The tag ``in_tail`` gives a line of ``/var/log/containers/<pod>_<ns>_<ctr>-<id>.log``
with ``tag kubernetes.*``."""

_FIELD_RE = re.compile(r"\{\{\s*\.([A-Za-z]+)\s*\}\}")
_ANY_ACTION_RE = re.compile(r"\{\{|\}\}")

_FIELDS: dict[str, Callable[[PodLog], str]] = {
    "PodName": lambda p: p.pod,
    "Namespace": lambda p: p.namespace,
    "PodID": lambda p: p.pod_uid,
    "ContainerName": lambda p: p.container,
    "ContainerID": lambda p: p.container_id,
    "RestartCount": lambda p: str(p.restart),
}


class TemplateError(ValueError):
    pass


def compile_tag(template: str) -> Callable[[PodLog], str]:
    """A tag template of a CRI log's fields; an unknown field is an error naming the known."""
    parts: list[str | Callable[[PodLog], str]] = []
    pos = 0
    for match in _FIELD_RE.finditer(template):
        literal = template[pos : match.start()]
        if _ANY_ACTION_RE.search(literal):
            raise TemplateError(f"{template!r}: unsupported template action in {literal!r}")
        if literal:
            parts.append(literal)
        if match[1] not in _FIELDS:
            allowed = " ".join("{{." + k + "}}" for k in _FIELDS)
            raise TemplateError(f"{template!r}: unknown field .{match[1]} (allowed: {allowed})")
        parts.append(_FIELDS[match[1]])
        pos = match.end()
    tail = template[pos:]
    if _ANY_ACTION_RE.search(tail):
        raise TemplateError(f"{template!r}: unsupported template action in {tail!r}")
    if tail:
        parts.append(tail)

    def render(log: PodLog) -> str:
        return "".join(p if isinstance(p, str) else p(log) for p in parts)

    return render


def kubernetes_map(log: PodLog) -> dict[str, Any]:
    return {
        "namespace_name": log.namespace,
        "pod_name": log.pod,
        "pod_id": log.pod_uid,
        "container_name": log.container,
        "container_id": log.container_id,
        "restart_count": log.restart,
    }


def record_maker(log: PodLog) -> Callable[[LogLine], dict[str, Any]]:
    """The record of a line of ``log``, the ``kubernetes`` map shared by all of them."""
    meta = kubernetes_map(log)

    def record(line: LogLine) -> dict[str, Any]:
        return {"stream": line.source, "logtag": "F", "log": line.text, "kubernetes": meta}

    return record
