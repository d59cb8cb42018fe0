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

from collections.abc import Callable
from typing import Any

from forwarder.kubernetes.pods import PodLog
from forwarder.records import LogLine
from forwarder.tags import compile_fields

DEFAULT_TAG = (
    "kubernetes.var.log.containers.{{.PodName}}_{{.Namespace}}_{{.ContainerName}}-"
    "{{.ContainerID}}.log"
)
"""The tag ``in_tail`` gives a line of ``/var/log/containers/<pod>_<ns>_<ctr>-<id>.log``
with ``tag kubernetes.*``."""

_FIELDS: dict[str, Callable[[PodLog], str]] = {
    "PodName": lambda p: p.pod,
    "Namespace": lambda p: p.namespace,
    "PodID": lambda p: p.pod_uid,
    "ContainerName": lambda p: p.container,
    "ContainerID": lambda p: p.container_id,
    "RestartCount": lambda p: str(p.restart),
}


def compile_tag(template: str) -> Callable[[PodLog], str]:
    """A tag template of a CRI log's fields; an unknown field is an error naming the known."""
    return compile_fields(template, _FIELDS)


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
