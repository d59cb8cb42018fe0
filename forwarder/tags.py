"""Docker-style tag templates, with the same meaning as ``docker run --log-opt tag=``.

Supported fields: ``{{.ID}}`` (12-character id), ``{{.FullID}}``, ``{{.Name}}`` (without the
leading ``/``), ``{{.ImageName}}``, ``{{.ImageID}}`` (12 characters, no ``sha256:``),
``{{.ImageFullID}}`` and ``{{.DaemonName}}`` (``docker``); and a label's value, spelt as in
Docker's templates (Go's ``index`` on ``.ContainerLabels``; empty when the container has no
such label): ``{{index .ContainerLabels "com.docker.compose.service"}}`` is the compose
service.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from forwarder.records import ContainerInfo

_FIELD_RE = re.compile(
    r'\{\{\s*(?:\.([A-Za-z]+)|index\s+\.ContainerLabels\s+"((?:[^"\\]|\\.)*)")\s*\}\}'
)
_ANY_ACTION_RE = re.compile(r"\{\{|\}\}")

_FIELDS: dict[str, Callable[[ContainerInfo], str]] = {
    "ID": lambda c: c.id[:12],
    "FullID": lambda c: c.id,
    "Name": lambda c: c.name.lstrip("/"),
    "ImageName": lambda c: c.image,
    "ImageID": lambda c: c.image_id.removeprefix("sha256:")[:12],
    "ImageFullID": lambda c: c.image_id,
    "DaemonName": lambda _c: "docker",
}

Template = Callable[[ContainerInfo], str]
T = TypeVar("T")


class TemplateError(ValueError):
    pass


def _label(key: str) -> Callable[[ContainerInfo], str]:
    return lambda c: c.labels.get(key, "")


def compile_template(template: str) -> Template:
    """Turn a template into a function of a container; unknown fields are an error."""
    return compile_fields(template, _FIELDS, _label)


def compile_fields(
    template: str,
    fields: Mapping[str, Callable[[T], str]],
    label: Callable[[str], Callable[[T], str]] | None = None,
) -> Callable[[T], str]:
    """A template of ``{{.Field}}`` (and, with ``label``, ``{{index .ContainerLabels "k"}}``)
    as a function of what the fields read; an unknown field is an error naming the known."""
    parts: list[str | Callable[[T], str]] = []
    pos = 0
    for match in _FIELD_RE.finditer(template):
        literal = template[pos : match.start()]
        if _ANY_ACTION_RE.search(literal):
            raise TemplateError(f"{template!r}: unsupported template action in {literal!r}")
        if literal:
            parts.append(literal)
        name = match[1]
        if name is None and label is not None:
            parts.append(label(match[2].replace('\\"', '"').replace("\\\\", "\\")))
            pos = match.end()
            continue
        if name not in fields:
            allowed = " ".join("{{." + k + "}}" for k in fields)
            if label is not None:
                allowed += ' {{index .ContainerLabels "key"}}'
            raise TemplateError(
                f"{template!r}: unknown field .{name or 'ContainerLabels'} (allowed: {allowed})"
            )
        parts.append(fields[name])
        pos = match.end()
    tail = template[pos:]
    if _ANY_ACTION_RE.search(tail):
        raise TemplateError(f"{template!r}: unsupported template action in {tail!r}")
    if tail:
        parts.append(tail)

    def render(item: T) -> str:
        return "".join(p if isinstance(p, str) else p(item) for p in parts)

    return render
