"""forwarder's own log lines: ``[service] log_format`` = "text" (for people) or "json".

JSON is one object per line: ``time`` (RFC 3339, UTC, microseconds), ``level``, ``logger``,
``message``, then the structured fields a call passes with ``extra=`` (:data:`FIELDS`: the
container, the server, the reason) as keys of their own, and ``exception`` with the
traceback when there is one. An aggregator that parses everything else can parse these too.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

FIELDS = ("container", "container_id", "server", "reason")
"""The ``extra=`` keys that become keys of their own in JSON lines."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: Literal["text", "json"]) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """The root logger to stderr, at ``level``, in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def apply(level: str, log_format: Literal["text", "json"]) -> None:
    """Change the level and format in place (a reload)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        handler.setFormatter(formatter(log_format))
