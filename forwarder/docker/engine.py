"""The Docker Engine API, through aiodocker: list, inspect, events, logs, stats.

Foreign errors are translated where they enter: ``aiodocker.DockerError`` and aiohttp's
connection errors become the small tree below, so callers decide on kinds, not on status
codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode

import aiodocker
import aiohttp

from forwarder import httpstream
from forwarder.config import Environment
from forwarder.records import ContainerId, ContainerInfo
from forwarder.timefmt import format_since, parse_time_ns
from forwarder.tuning import ENGINE_CONNECT_TIMEOUT_S, ENGINE_REQUEST_TIMEOUT_S

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
ERROR_BODY_BYTES = 64 * 1024  # an engine error is one JSON line: {"message": "..."}


class EngineError(Exception):
    """Something went wrong talking to the Docker engine."""


class EngineUnavailableError(EngineError):
    """The engine can't be reached, or the stream broke: transient, retry with backoff."""


class ContainerGoneError(EngineError):
    """The container no longer exists (404): permanent for this container."""


class LogsUnsupportedError(EngineError):
    """The container's log driver can't be read through the API (501): permanent."""


def _translate(exc: BaseException, what: str) -> EngineError:
    if isinstance(exc, aiodocker.DockerError):
        status = exc.status
        message = exc.message
        if status == 404 or (status == 409 and "marked for removal" in str(message)):
            # 409: a --rm container that exited is being removed; its log is gone with it.
            return ContainerGoneError(f"{what}: {message}")
        if status == 501 or "does not support reading" in str(message):
            return LogsUnsupportedError(f"{what}: {message}")
        if status == 900 or status >= 500:
            return EngineUnavailableError(f"{what}: {message}")
        return EngineError(f"{what}: HTTP {status}: {message}")
    if isinstance(exc, aiohttp.ClientError | OSError | asyncio.IncompleteReadError):
        return EngineUnavailableError(f"{what}: {describe(exc)}")
    return EngineError(f"{what}: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """An exception's message, or its class name when it has none: a bare ``TimeoutError()``
    or ``aiohttp.ClientConnectionError()`` does not log as an empty reason."""
    return str(exc) or type(exc).__name__


def _engine_time(text: str | None) -> int:
    """An inspect time (``StartedAt``, ``FinishedAt``) in ns; 0 for Go's zero time."""
    if not text or text.startswith("0001-01-01"):
        return 0
    return parse_time_ns(text)


def container_from_inspect(data: Mapping[str, Any]) -> ContainerInfo:
    config = data.get("Config") or {}
    state = data.get("State") or {}
    host_config = data.get("HostConfig") or {}
    return ContainerInfo(
        id=data["Id"],
        name=data.get("Name") or "/" + data["Id"][:12],
        image=config.get("Image") or "",
        image_id=data.get("Image") or "",
        tty=bool(config.get("Tty")),
        labels=config.get("Labels") or {},
        env=tuple(config.get("Env") or ()),
        log_driver=(host_config.get("LogConfig") or {}).get("Type") or "",
        log_path=data.get("LogPath") or "",
        started_at_ns=_engine_time(state.get("StartedAt")),
        finished_at_ns=_engine_time(state.get("FinishedAt")),
        running=bool(state.get("Running")),
    )


def _unpooled(host: str, *, tls_verify: bool) -> tuple[str, aiohttp.BaseConnector | None]:
    """aiodocker's URL and a connector without aiohttp's default cap of 100 connections.

    Each followed container holds one or two streams open (logs, stats): under a cap, every
    request past it would wait for a stream to end. ``None``: aiodocker's own connector
    (``tcp://`` with ``DOCKER_TLS_VERIFY``, which aiodocker sets up itself).
    """
    if host.startswith("unix://"):
        return "unix://localhost", aiohttp.UnixConnector(host.removeprefix("unix://"), limit=0)
    if host.startswith("tcp://") and not tls_verify:
        return "http://" + host.removeprefix("tcp://"), aiohttp.TCPConnector(limit=0)
    return host, None


class Engine:
    """A thin async shell over the Engine API."""

    def __init__(self, host: str, *, tls_verify: bool | None = None) -> None:
        self.host = host
        self.tls_verify = Environment.read().docker_tls_verify if tls_verify is None else tls_verify
        """``DOCKER_TLS_VERIFY``: a ``tcp://`` host is reached over TLS (by aiodocker)."""
        self._docker: aiodocker.Docker | None = None
        self._connector: aiohttp.BaseConnector | None = None
        self._log_streams = 0  # log_bytes() connections of its own, outside aiohttp's pool

    def __repr__(self) -> str:
        return f"<Engine {self.host}>"

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            url, self._connector = _unpooled(self.host, tls_verify=self.tls_verify)
            # Long-lived streams set their own timeouts; plain requests get a total one.
            self._docker = aiodocker.Docker(
                url=url,
                connector=self._connector,
                timeout=aiohttp.ClientTimeout(
                    total=ENGINE_REQUEST_TIMEOUT_S, sock_connect=ENGINE_CONNECT_TIMEOUT_S
                ),
            )
        return self._docker

    async def aclose(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None
        if self._connector is not None:
            await self._connector.close()
            self._connector = None

    def open_connections(self) -> int | None:
        """Connections to the engine open now (streams, requests, idle keep-alive ones);
        None when aiohttp's connector does not show them (its pool is private)."""
        if self._docker is None:
            return 0
        connector = self._docker.connector
        acquired = getattr(connector, "_acquired", None)
        idle = getattr(connector, "_conns", None)
        if not isinstance(acquired, set) or not isinstance(idle, dict):
            return None
        # The idle pool keeps a connection the engine closed until its next clean-up.
        protocols = [*acquired, *(entry[0] for conns in idle.values() for entry in conns)]
        pooled = sum(1 for proto in protocols if getattr(proto, "is_connected", lambda: True)())
        return pooled + self._log_streams

    async def _json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        try:
            return await self.docker._query_json(path, "GET", params=dict(params or {}))
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, f"GET /{path}") from exc

    async def ping(self) -> None:
        await self._json("version")

    async def list_container_ids(self, *, all: bool = False) -> list[ContainerId]:
        items = await self._json("containers/json", {"all": int(all)})
        return [ContainerId(item["Id"]) for item in items]

    async def name(self) -> str:
        """The engine's name (``docker info``'s Name: the host's name, usually)."""
        info = await self._json("info", {})
        return str(info.get("Name") or "")

    async def inspect(self, cid: str) -> ContainerInfo:
        return container_from_inspect(await self._json(f"containers/{cid}/json"))

    @asynccontextmanager
    async def _stream(self, path: str, params: Mapping[str, Any]) -> AsyncIterator[Any]:
        try:
            async with (
                self.docker._query(
                    path,
                    "GET",
                    params=dict(params),
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_read=None, sock_connect=ENGINE_CONNECT_TIMEOUT_S
                    ),
                ) as response,
                response,
            ):  # aiodocker leaves closing the response to us
                yield response
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, f"GET /{path}") from exc

    async def log_bytes(
        self,
        cid: str,
        *,
        follow: bool,
        since: str | None = None,
        until: str | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The raw body of ``/containers/{id}/logs`` with timestamps, in reads of up to 64 KiB.

        On a ``unix://`` or plain ``tcp://`` host the response is read off a socket of its own
        by :mod:`forwarder.httpstream`, which decodes a whole read's HTTP chunks (the
        engine sends one per log frame) in one call, where aiohttp makes several Python calls
        a chunk. Other hosts (TLS) go through aiohttp, whose ``read(n)`` also joins buffered
        chunks. Errors are the same on both paths.
        """
        params: dict[str, Any] = {
            "follow": int(follow),
            "stdout": 1,
            "stderr": 1,
            "timestamps": 1,
        }
        if since is not None:
            params["since"] = since
        if until is not None:
            params["until"] = until
        endpoint = httpstream.plain_endpoint(self.host, tls_verify=self.tls_verify)
        reads = (
            self._log_bytes_aiohttp(cid, params)
            if endpoint is None
            else self._log_bytes_direct(endpoint, cid, params)
        )
        async with contextlib.aclosing(reads):
            async for data in reads:
                yield data

    async def _log_bytes_direct(
        self, endpoint: httpstream.Endpoint, cid: str, params: Mapping[str, Any]
    ) -> AsyncGenerator[bytes, None]:
        # The API version aiodocker negotiated (it asks /version at its first request);
        # unversioned, the engine serves its own newest version, the one it would negotiate.
        version = self.docker.api_version
        prefix = f"/{version}" if version != "auto" else ""
        target = f"{prefix}/containers/{quote(cid, safe='')}/logs?{urlencode(params)}"
        self._log_streams += 1
        try:
            async with httpstream.open_response(
                endpoint, target, connect_timeout_s=ENGINE_CONNECT_TIMEOUT_S
            ) as response:
                if not response.head.ok:
                    body = await response.read_body(ERROR_BODY_BYTES)
                    error = aiodocker.DockerError(response.status, _error_message(body))
                    # The same translation as aiodocker's errors on the other path.
                    raise _translate(error, f"GET /containers/{cid}/logs") from error
                async with contextlib.aclosing(response.iter_body()) as reads:
                    async for data in reads:
                        yield data
        except httpstream.HttpError as exc:
            raise EngineUnavailableError(f"GET /containers/{cid[:12]}/logs: {exc}") from exc
        finally:
            self._log_streams -= 1

    async def _log_bytes_aiohttp(
        self, cid: str, params: Mapping[str, Any]
    ) -> AsyncGenerator[bytes, None]:
        async with self._stream(f"containers/{cid}/logs", params) as response:
            content = response.content
            try:
                while True:
                    data = await content.read(READ_SIZE)
                    if not data:
                        return
                    yield data
            except (aiohttp.ClientError, OSError) as exc:
                raise _translate(exc, f"GET /containers/{cid[:12]}/logs") from exc

    async def events(self, *, since_ns: int | None) -> AsyncIterator[dict[str, Any]]:
        """Container events from ``/events``, from ``since_ns`` on, as decoded JSON objects."""
        params: dict[str, Any] = {"filters": json.dumps({"type": ["container"]})}
        if since_ns is not None:
            params["since"] = format_since(since_ns)
        async with self._stream("events", params) as response:
            async for obj in _json_objects(response, "GET /events"):
                yield obj

    async def stats_once(self, cid: str) -> dict[str, Any]:
        """One Stats API sample, read at once (``one-shot``: no ``precpu_stats``)."""
        sample = await self._json(f"containers/{cid}/stats", {"stream": 0, "one-shot": 1})
        if not isinstance(sample, dict):
            raise EngineError(f"GET /containers/{cid[:12]}/stats: not a JSON object")
        return sample

    async def init_pid(self, cid: str) -> int:
        """The host pid of the container's init process (``State.Pid``); 0 if not running."""
        data = await self._json(f"containers/{cid}/json")
        pid = data.get("State", {}).get("Pid", 0) if isinstance(data, dict) else 0
        return pid if isinstance(pid, int) else 0

    async def stats_stream(self, cid: str, *, stream: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Stats API samples for one container (one a second while streaming)."""
        params = {"stream": int(stream)}
        async with self._stream(f"containers/{cid}/stats", params) as response:
            async for obj in _json_objects(response, f"GET /containers/{cid[:12]}/stats"):
                yield obj


class JsonStreamDecoder:
    """Sans-I/O: a stream of concatenated JSON objects (as /events and /stats send them)
    in, objects out. An undecodable line is logged and skipped, never fatal."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._decoder = json.JSONDecoder()
        self._pending = ""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._pending += data.decode("utf-8", "replace")
        out: list[dict[str, Any]] = []
        while True:
            pending = self._pending = self._pending.lstrip()
            if not pending:
                break
            try:
                obj, end = self._decoder.raw_decode(pending)
            except json.JSONDecodeError:
                if "\n" not in pending:
                    break  # an object cut in the middle: wait for the rest
                bad, _, self._pending = pending.partition("\n")
                log.warning("%s: skipped undecodable bytes %r", self._what, bad[:80])
                continue
            self._pending = pending[end:]
            if isinstance(obj, dict):
                out.append(obj)
        return out


def _error_message(body: bytes) -> str:
    """An engine error body's message: ``{"message": "..."}``, else the text itself."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    return text.strip()


async def _json_objects(response: Any, what: str) -> AsyncIterator[dict[str, Any]]:
    decoder = JsonStreamDecoder(what)
    try:
        while True:
            data = await response.content.readany()
            if not data:
                return
            for obj in decoder.feed(data):
                yield obj
    except (aiohttp.ClientError, OSError) as exc:
        raise _translate(exc, what) from exc
