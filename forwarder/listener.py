"""The HTTP listener, ``[service] http_listen``: /metrics, /healthz, /readyz, POST /-/reload.

It runs on the event loop, so a scrape reads the pipeline's counters on the thread that
changes them, and /healthz answering at all says the loop answers. Shipping never depends on
it: an address taken by another process is logged, naming the key, and tried again every
:data:`BIND_RETRY_S` seconds. The requests are tiny and local (Prometheus, a probe, an
operator's curl): one request per connection, a header cap, a read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from forwarder.config import split_listen
from forwarder.health import liveness, readiness
from forwarder.metrics import registry_for

if TYPE_CHECKING:
    from forwarder.pipeline import Pipeline

log = logging.getLogger(__name__)

BIND_RETRY_S = 5.0
"""Between tries to bind a taken address: a collector that stopped frees it within this."""
MAX_HEADER_BYTES = 16 * 1024
"""A request line and headers; ours are a few hundred bytes."""
READ_TIMEOUT_S = 10.0
"""A client that sends no whole request in this long is dropped."""

Reload = Callable[[], Awaitable[tuple[bool, str]]]
"""Re-read the config: (applied, what happened)."""


class Listener:
    def __init__(self, address: str, pipeline: Pipeline, reload: Reload | None = None) -> None:
        self.address = address
        self.pipeline = pipeline
        self.reload = reload
        self.registry = registry_for(pipeline)
        self.server: asyncio.Server | None = None
        self.bound = asyncio.Event()

    async def run(self) -> None:
        """Bind (again and again while the address is taken), then serve until cancelled."""
        host, port = split_listen(self.address)
        logged = False
        while True:
            try:
                self.server = await asyncio.start_server(
                    self._serve, host or None, port, reuse_address=True
                )
                break
            except OSError as exc:
                if not logged:
                    log.error(
                        "[service] http_listen: can't listen on %s (%s); metrics and health "
                        "are off until it can (tried again every %.0fs), shipping goes on",
                        self.address,
                        exc.strerror or exc,
                        BIND_RETRY_S,
                        extra={"reason": exc.strerror or str(exc)},
                    )
                    logged = True
                await asyncio.sleep(BIND_RETRY_S)
        if logged:
            log.info("[service] http_listen: listening on %s now", self.address)
        self.bound.set()
        try:
            await self.server.serve_forever()
        finally:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        try:
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("ascii")
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes]:
        if len(head) > MAX_HEADER_BYTES:
            return 431, "text/plain", b"request header too large\n"
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path == "/metrics" and method in ("GET", "HEAD"):
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path in ("/healthz", "/readyz") and method in ("GET", "HEAD"):
            verdict = (liveness if path == "/healthz" else readiness)(self.pipeline)
            return _json(200 if verdict.ok else 503, verdict.body())
        if path == "/-/reload":
            if method != "POST":
                return 405, "text/plain", b"POST to reload\n"
            if self.reload is None:
                return _json(501, {"status": "failing", "reasons": ["reload is not available"]})
            applied, message = await self.reload()
            return _json(
                200 if applied else 400,
                {"status": "ok" if applied else "failing", "message": message},
            )
        return 404, "text/plain", b"not found: /metrics, /healthz, /readyz, POST /-/reload\n"


def _json(status: int, body: dict[str, object]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}
