"""An HTTP/1.1 response read straight off a socket: a sans-I/O reader and a thin async shell.

Why: the engine writes every log frame of ``/containers/{id}/logs`` as its own HTTP chunk
(``Transfer-Encoding: chunked``, one flush per frame). aiohttp hands each chunk through
several Python calls (``feed_data``, ``end_http_chunk_receiving``, ``resume_reading``...);
:class:`ResponseReader` decodes a whole 64 KiB read in one loop of ``re.match`` and slicing
and returns its body as one ``bytes``. Reading a replayed 300,000-frame response on uvloop:
1.16 µs a line through aiohttp, 0.57 through this module.

- :class:`ResponseReader` (sans-I/O, h11-style): bytes in, body bytes out, the status line
  and headers on :attr:`ResponseReader.head`. Body framing as RFC 9112 §6.3 says for a
  response to a GET: none for 1xx/204/304, else ``Transfer-Encoding: chunked`` (size lines
  with optional extensions, a trailer section, the final ``0`` chunk), else
  ``Content-Length``, else everything until the peer closes. Line ends must be CRLF (Go's
  net/http, the engine's server, writes nothing else). Any split of the input gives the same
  body as feeding it whole.
- :func:`open_response` (the async shell): connect (unix socket or plain TCP), send one
  ``GET``, read, feed the reader; nothing else. ``Connection: close``: one request a
  connection, so nothing is pooled and closing the response closes the socket.

Errors say whose fault it was: :class:`HttpStreamError` (the peer sent something that is not
HTTP, naming the stream offset), :class:`IncompleteResponseError` (the peer closed before
the end), :class:`HttpConnectError` / :class:`HttpIOError` (the socket), all under
:class:`HttpError`; :class:`ReaderUsageError` is ours (a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from forwarder.timefmt import format_duration

__all__ = [
    "MAX_CHUNK_LINE_BYTES",
    "MAX_HEAD_BYTES",
    "READ_BYTES",
    "HttpConnectError",
    "HttpError",
    "HttpIOError",
    "HttpStreamError",
    "IncompleteResponseError",
    "ReaderState",
    "ReaderUsageError",
    "Response",
    "ResponseHead",
    "ResponseReader",
    "TcpEndpoint",
    "UnixEndpoint",
    "encode_get",
    "open_response",
    "plain_endpoint",
]

MAX_HEAD_BYTES: Final = 64 * 1024
"""The longest status line + headers (and, separately, trailer section) accepted. The engine
sends about 250 bytes of headers; Go's clients allow servers 1 MiB, but a peer that sends
64 KiB without a blank line is not the engine, and holding more only costs memory."""

MAX_CHUNK_LINE_BYTES: Final = 4096
"""The longest chunk-size line (size, extensions, CRLF): Go's chunked reader has the same cap
(``maxLineLength`` in net/http/internal/chunked.go). The engine sends no extensions."""

READ_BYTES: Final = 64 * 1024
"""One socket read: about 450 log frames of a typical line."""

_SHOW_BYTES: Final = 40

# RFC 9112 §4: HTTP-version SP 3DIGIT SP reason-phrase (the reason may be empty; a missing
# SP before it is tolerated, as h11 does). Only HTTP/1.0 and 1.1 are HTTP/1.x responses.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# field-name ":" OWS field-value OWS, field-name a token (RFC 9110 §5.1, §5.6.2).
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
# chunk-size [chunk-ext] CRLF (RFC 9112 §7.1); extensions are skipped, not interpreted.
# 16 hex digits hold any 64-bit size; more would be a lie or an attack.
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
# The CRLF that ends a chunk's data, then the next size line: one match a chunk.
_DATA_END_SIZE_LINE = re.compile(rb"\r\n([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")
_TOKEN_STARTS: Final = frozenset(
    bytes([c])
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def _show(data: bytes | memoryview) -> str:
    """At most ``_SHOW_BYTES`` of ``data``, printable."""
    head = bytes(data[:_SHOW_BYTES])
    return repr(head) + ("..." if len(data) > _SHOW_BYTES else "")


class HttpError(Exception):
    """Reading an HTTP response failed: the peer or the socket, never the caller."""


class HttpConnectError(HttpError):
    """The connection could not be made (refused, no such socket, timed out)."""


class HttpIOError(HttpError):
    """The socket failed while sending the request or reading the response."""


class HttpStreamError(HttpError):
    """The peer sent bytes that are not an HTTP/1.1 response; ``offset`` is where, counted
    from the first byte of the response."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset} of the response)")
        self.offset = offset


class IncompleteResponseError(HttpStreamError):
    """The peer closed the connection before the end of the response."""


class ReaderUsageError(Exception):
    """The reader was used out of turn (fed after an error or after EOF): our bug."""


class ReaderState(enum.Enum):
    HEAD = "HEAD"  # status line and headers
    CHUNKED = "CHUNKED"  # chunked body: size lines and data
    TRAILERS = "TRAILERS"  # after the last chunk: the trailer section and its blank line
    FIXED_LENGTH = "FIXED_LENGTH"  # Content-Length body
    UNTIL_EOF = "UNTIL_EOF"  # body delimited by the peer closing the connection
    DONE = "DONE"  # the whole response was read
    ERROR = "ERROR"  # the peer broke the protocol; the reader is unusable


_S = ReaderState
_TRANSITIONS: Final[dict[ReaderState, frozenset[ReaderState]]] = {
    _S.HEAD: frozenset({_S.HEAD, _S.CHUNKED, _S.FIXED_LENGTH, _S.UNTIL_EOF, _S.DONE}),
    _S.CHUNKED: frozenset({_S.TRAILERS}),
    _S.TRAILERS: frozenset({_S.DONE}),
    _S.FIXED_LENGTH: frozenset({_S.DONE}),
    _S.UNTIL_EOF: frozenset({_S.DONE}),
    _S.DONE: frozenset(),
    _S.ERROR: frozenset(),
}
"""Every state change the reader makes (besides ERROR, reachable from any state)."""


@dataclass(frozen=True)
class ResponseHead:
    """The status line and header fields. Names are lower-cased; values are latin-1 text
    without surrounding whitespace; a name may repeat, in the order received."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    http_version: str = "1.1"

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 999:
            raise ValueError(f"status {self.status} is not three digits")
        if self.http_version not in ("1.0", "1.1"):
            raise ValueError(f"HTTP/{self.http_version} is not HTTP/1.x")
        for name, _ in self.headers:
            if not name or name != name.lower():
                raise ValueError(f"header name {name!r} is empty or not lower-case")

    def header(self, name: str) -> str | None:
        """A header's value, repeated fields joined with ``", "`` (RFC 9110 §5.3); None if
        absent."""
        key = name.lower()
        values = [value for field, value in self.headers if field == key]
        return ", ".join(values) if values else None

    @property
    def ok(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status < 300


def _parse_fields(block: bytes, base: int, what: str) -> list[tuple[str, str]]:
    """Header or trailer field lines, CRLF-separated, without the final blank line."""
    fields: list[tuple[str, str]] = []
    offset = base
    for line in block.split(b"\r\n"):
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            if line[:1] in (b" ", b"\t"):
                # RFC 9112 §5.2: obs-fold; a user agent may reject it, and the engine never
                # folds, so a fold means we are not talking to it.
                raise HttpStreamError(f"folded {what} line {_show(line)}", offset)
            raise HttpStreamError(f"malformed {what} line {_show(line)}", offset)
        fields.append((match[1].decode("ascii").lower(), match[2].decode("latin-1")))
        offset += len(line) + 2
    return fields


def _parse_head(block: bytes, base: int) -> ResponseHead:
    """The status line and header fields, ``block`` ending before the blank line."""
    status_line, _, field_block = block.partition(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise HttpStreamError(f"not an HTTP/1.x status line: {_show(status_line)}", base)
    fields = (
        _parse_fields(field_block, base + len(status_line) + 2, "header") if field_block else []
    )
    return ResponseHead(
        status=int(match[2]),
        reason=(match[3] or b"").decode("latin-1"),
        headers=tuple(fields),
        http_version=f"1.{match[1].decode()}",
    )


class ResponseReader:
    """Sans-I/O: the bytes of one HTTP/1.x response to a GET in, its body out.

    ``feed(data)`` returns the body bytes that ``data`` completes (``b""`` for none), as one
    ``bytes`` per call however many chunks ``data`` holds; :attr:`head` is set once the
    status line and headers are in (1xx interim responses are skipped). ``feed_eof()`` says
    the peer closed: it ends a body delimited by EOF, and raises
    :class:`IncompleteResponseError` if the response was cut short. Bytes after the end of
    the response raise :class:`HttpStreamError`. After an error every call raises
    :class:`ReaderUsageError`.

    Held back between calls, never more: an incomplete head or trailer section (up to
    ``max_head_bytes``) or chunk-size line (up to :data:`MAX_CHUNK_LINE_BYTES`). Chunk data
    is never held: it goes out in the call that brings it.
    """

    __slots__ = (
        "_broken",
        "_chunk_left",
        "_data_end",
        "_fixed_left",
        "_max_head_bytes",
        "_pending",
        "_received",
        "_state",
        "head",
        "trailers",
    )

    def __init__(self, *, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self.head: ResponseHead | None = None
        self.trailers: tuple[tuple[str, str], ...] = ()
        self._max_head_bytes = max_head_bytes
        self._state = ReaderState.HEAD
        self._pending = b""  # held-back bytes (see the class docstring)
        self._received = 0  # bytes fed so far: the stream offset of the end of _pending
        self._chunk_left = 0  # CHUNKED: data bytes left in the current chunk
        self._data_end = False  # CHUNKED: a chunk's data ended; its CRLF comes next
        self._fixed_left = 0  # FIXED_LENGTH: body bytes left
        self._broken: str | None = None

    def __repr__(self) -> str:
        status = self.head.status if self.head is not None else "-"
        return (
            f"<ResponseReader {self._state.name} status={status} received={self._received}"
            f" pending={len(self._pending)}>"
        )

    @property
    def state(self) -> ReaderState:
        return self._state

    @property
    def done(self) -> bool:
        """The whole response has been read."""
        return self._state is ReaderState.DONE

    @property
    def pending_bytes(self) -> int:
        """Bytes held back until more arrive."""
        return len(self._pending)

    def _enter(self, state: ReaderState) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise ReaderUsageError(f"no transition {self._state.name} -> {state.name}")
        self._state = state

    def feed(self, data: bytes) -> bytes:
        """Parse ``data``; returns the body bytes it completes."""
        if self._is_done(data):
            return b""
        pending = self._pending
        buf = pending + data if pending else data
        base = self._received - len(pending)  # stream offset of buf[0]
        self._received += len(data)
        out: list[bytes] = []
        pos = 0
        try:
            while True:
                state = self._state
                if state is ReaderState.CHUNKED:
                    pos = self._chunked(buf, pos, base, out)
                elif state is ReaderState.HEAD:
                    pos = self._head(buf, pos, base, len(pending))
                elif state is ReaderState.FIXED_LENGTH:
                    pos = self._fixed_length(buf, pos, out)
                elif state is ReaderState.UNTIL_EOF:
                    out.append(buf[pos:])
                    pos = len(buf)
                elif state is ReaderState.TRAILERS:
                    pos = self._trailers(buf, pos, base)
                if self._state is ReaderState.DONE:
                    self._refuse_after_done(buf, pos, base)
                    break
                if self._state is state:
                    break  # it took what it could: the rest needs more bytes
        except HttpStreamError as exc:
            self._broken = str(exc)
            self._state = ReaderState.ERROR
            self._pending = b""
            raise
        self._pending = buf[pos:] if pos < len(buf) else b""
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _is_done(self, data: bytes) -> bool:
        """Whether the response was complete before ``data``, which must then be empty; a
        broken response takes no more."""
        if self._broken is not None:
            raise ReaderUsageError(f"the response is already broken: {self._broken}")
        if self._state is not ReaderState.DONE:
            return False
        if data:
            self._fail(f"{len(data)} bytes after the end of the response", self._received)
        return True

    def _fixed_length(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Take the Content-Length body's bytes from ``pos``; the new position."""
        take = min(self._fixed_left, len(buf) - pos)
        if take:
            out.append(buf[pos : pos + take])
            pos += take
            self._fixed_left -= take
        if not self._fixed_left:
            self._enter(ReaderState.DONE)
        return pos

    def _refuse_after_done(self, buf: bytes, pos: int, base: int) -> None:
        """Bytes past the end of the response are the server's fault."""
        if pos < len(buf):
            self._fail(
                f"{len(buf) - pos} bytes after the end of the response: {_show(buf[pos:])}",
                base + pos,
            )

    def feed_eof(self) -> None:
        """The peer closed the connection: the end of a body delimited by EOF; anywhere
        else before the end, :class:`IncompleteResponseError`."""
        if self._broken is not None:
            raise ReaderUsageError(f"the response is already broken: {self._broken}")
        state = self._state
        if state is ReaderState.DONE:
            return
        if state is ReaderState.UNTIL_EOF:
            self._enter(ReaderState.DONE)
            return
        if state is ReaderState.HEAD:
            what = "before a response" if not self._received else "in the response head"
        elif state is ReaderState.FIXED_LENGTH:
            what = f"{self._fixed_left} bytes short of the Content-Length body"
        elif state is ReaderState.CHUNKED:
            what = "in the middle of the chunked body"
        else:
            what = "in the chunked body's trailer section"
        self._broken = f"the connection closed {what}"
        self._state = ReaderState.ERROR
        raise IncompleteResponseError(self._broken, self._received)

    def _fail(self, message: str, offset: int) -> None:
        self._broken = message
        self._state = ReaderState.ERROR
        self._pending = b""
        raise HttpStreamError(message, offset)

    # ---- the head --------------------------------------------------------------------

    def _head(self, buf: bytes, pos: int, base: int, scanned: int) -> int:
        """Parse heads (skipping 1xx ones) from ``pos``; the new position. ``buf[:scanned]``
        was searched for the blank line by an earlier call."""
        limit = self._max_head_bytes
        while self._state is ReaderState.HEAD:
            # The blank line may straddle the previous call's end: search from 3 back.
            end = buf.find(b"\r\n\r\n", max(pos, scanned - 3))
            if end < 0:
                self._check_partial_head(buf, pos, base)
                return pos
            if end + 4 - pos > limit:
                raise HttpStreamError(
                    f"response head of {end + 4 - pos} bytes, more than {limit}", base + pos
                )
            head = _parse_head(buf[pos:end], base + pos)
            pos = end + 4
            self._start_body(head, base + pos)
        return pos

    def _check_partial_head(self, buf: bytes, pos: int, base: int) -> None:
        """An incomplete head: raise if it is too long or can't be a response's start."""
        limit = self._max_head_bytes
        if len(buf) - pos >= limit:  # with its blank line still to come it would be longer
            raise HttpStreamError(f"no end of the response head within {limit} bytes", base + pos)
        line_end = buf.find(b"\r\n", pos, pos + limit)
        if line_end >= 0:
            status_line = buf[pos:line_end]
            if _STATUS_LINE.fullmatch(status_line) is None:
                raise HttpStreamError(
                    f"not an HTTP/1.x status line: {_show(status_line)}", base + pos
                )
        elif not buf.startswith(b"HTTP/1."[: len(buf) - pos], pos):
            raise HttpStreamError(f"not an HTTP/1.x status line: {_show(buf[pos:])}", base + pos)

    def _start_body(self, head: ResponseHead, offset: int) -> None:
        """Choose the body's framing (RFC 9112 §6.3, for a response to a GET)."""
        status = head.status
        if 100 <= status < 200:
            if status == 101:
                raise HttpStreamError(
                    "101 Switching Protocols to a request without Upgrade", offset
                )
            self._enter(ReaderState.HEAD)  # an interim response: the real one follows
            return
        self.head = head
        if status in (204, 304):
            self._enter(ReaderState.DONE)
            return
        coding = head.header("transfer-encoding")
        if coding is not None:
            codings = [c.strip().lower() for c in coding.split(",") if c.strip()]
            if codings != ["chunked"]:
                # Anything else would need decoding we don't do; the engine only chunks.
                raise HttpStreamError(f"unsupported Transfer-Encoding {coding!r}", offset)
            self._enter(ReaderState.CHUNKED)
            return
        length = head.header("content-length")
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise HttpStreamError(f"invalid Content-Length {length!r}", offset)
            self._fixed_left = int(values.pop())
            self._enter(ReaderState.FIXED_LENGTH if self._fixed_left else ReaderState.DONE)
            return
        self._enter(ReaderState.UNTIL_EOF)

    # ---- the chunked body --------------------------------------------------------------

    def _chunked(self, src: bytes, pos: int, base: int, out: list[bytes]) -> int:
        """Chunks from ``pos``: data goes to ``out``; the new position.

        The hot path, per chunk: one regex match for the previous data's CRLF and the size
        line, one ``int()``, one slice of the data."""
        end = len(src)
        left = self._chunk_left
        data_end = self._data_end
        if left:  # the rest of a chunk begun in an earlier call
            stop = pos + left
            if stop > end:
                out.append(src[pos:])
                self._chunk_left = stop - end
                return end
            out.append(src[pos:stop])
            pos = stop
            data_end = True
        size_line = _DATA_END_SIZE_LINE.match
        append = out.append
        match = size_line(src, pos) if data_end else _SIZE_LINE.match(src, pos)
        while match is not None:
            stop = match.end()
            if stop - pos > MAX_CHUNK_LINE_BYTES:  # the match may include the data's CRLF
                self._check_line_length(match, base)
            left = int(match[1], 16)
            if not left:
                self._chunk_left = 0
                self._data_end = False
                self._enter(ReaderState.TRAILERS)
                return stop
            pos = stop + left  # the end of this chunk's data
            if pos > end:
                append(src[stop:])
                self._chunk_left = pos - end
                self._data_end = False
                return end
            append(src[stop:pos])
            data_end = True
            match = size_line(src, pos)
        self._check_size_line(src, pos, base, data_end)
        self._chunk_left = 0
        self._data_end = data_end
        return pos

    @staticmethod
    def _check_line_length(match: re.Match[bytes], base: int) -> None:
        start = match.start(1)
        length = match.end() - start
        if length > MAX_CHUNK_LINE_BYTES:
            raise HttpStreamError(
                f"chunk-size line of {length} bytes, more than {MAX_CHUNK_LINE_BYTES}",
                base + start,
            )

    def _check_size_line(self, src: bytes, pos: int, base: int, data_end: bool) -> None:
        """No size line matched at ``pos``: raise if what is there can't become one."""
        rest = src[pos : pos + MAX_CHUNK_LINE_BYTES + 2]
        if data_end:
            if not b"\r\n".startswith(rest[:2]):
                raise HttpStreamError(f"chunk data not followed by CRLF: {_show(rest)}", base + pos)
            rest = rest[2:]
            pos += 2
        if rest and rest[0] not in _HEX_DIGITS:
            raise HttpStreamError(f"malformed chunk-size line {_show(rest)}", base + pos)
        if b"\n" in rest:
            raise HttpStreamError(f"malformed chunk-size line {_show(rest)}", base + pos)
        if len(rest) >= MAX_CHUNK_LINE_BYTES:  # and its LF still to come
            raise HttpStreamError(
                f"chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes", base + pos
            )

    def _trailers(self, buf: bytes, pos: int, base: int) -> int:
        """The trailer section after the last chunk and its blank line; the new position."""
        if buf.startswith(b"\r\n", pos):
            self._enter(ReaderState.DONE)
            return pos + 2
        limit = self._max_head_bytes
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            if len(buf) - pos >= limit:
                raise HttpStreamError(
                    f"no end of the trailer section within {limit} bytes", base + pos
                )
            # Not the blank line (yet): a field line must start here; check it early.
            first = buf[pos : pos + 1]
            # A CR here is the blank line's, and startswith() above saw no LF after it.
            bad_cr = first == b"\r" and len(buf) - pos >= 2
            if bad_cr or (first not in (b"", b"\r") and first not in _TOKEN_STARTS):
                raise HttpStreamError(f"malformed trailer line {_show(buf[pos:])}", base + pos)
            return pos
        if end + 4 - pos > limit:
            raise HttpStreamError(
                f"trailer section of {end + 4 - pos} bytes, more than {limit}", base + pos
            )
        self.trailers = tuple(_parse_fields(buf[pos:end], base + pos, "trailer"))
        self._enter(ReaderState.DONE)
        return end + 4


# ------------------------------------------------------------------------------- the shell


@dataclass(frozen=True)
class UnixEndpoint:
    path: str

    @property
    def host_header(self) -> str:
        return "localhost"  # what aiohttp's UnixConnector sends

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True)
class TcpEndpoint:
    host: str
    port: int

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"tcp://{self.host_header}"


Endpoint = UnixEndpoint | TcpEndpoint


def plain_endpoint(docker_host: str, *, tls_verify: bool) -> Endpoint | None:
    """Where a ``DOCKER_HOST`` URL's engine listens without TLS: ``unix://PATH``, or
    ``tcp://HOST:PORT`` when TLS is not on. None for anything else (``https://``, TLS,
    ``ssh://``, ``npipe://``), which is left to aiohttp."""
    if docker_host.startswith("unix://"):
        return UnixEndpoint(docker_host.removeprefix("unix://"))
    if docker_host.startswith("tcp://") and not tls_verify:
        url = urlsplit(docker_host)
        # aiohttp gets this host as "http://HOST[:PORT]": same default port as it.
        return TcpEndpoint(url.hostname or "localhost", url.port or 80)
    return None


def encode_get(target: str, host_header: str) -> bytes:
    """A GET request for ``target`` (path and query), closing the connection after it."""
    if not target.startswith("/") or any(c in target for c in " \r\n"):
        raise ValueError(f"request target {target!r} is not an origin-form path")
    return (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: forwarder\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


class Response:
    """An open response: its head, then its body as read from the socket."""

    def __init__(
        self,
        endpoint: Endpoint,
        stream: asyncio.StreamReader,
        reader: ResponseReader,
        head: ResponseHead,
        first_body: bytes,
        read_bytes: int,
    ) -> None:
        self.endpoint = endpoint
        self.head = head
        self._stream = stream
        self._reader = reader
        self._first_body = first_body
        self._read_bytes = read_bytes

    def __repr__(self) -> str:
        return f"<Response {self.endpoint} {self.head.status} {self._reader.state.name}>"

    @property
    def status(self) -> int:
        return self.head.status

    async def iter_body(self) -> AsyncGenerator[bytes, None]:
        """The body, one piece per socket read (many chunks each); ends at its end."""
        if self._first_body:
            body, self._first_body = self._first_body, b""
            yield body
        reader = self._reader
        read = self._stream.read
        size = self._read_bytes
        while not reader.done:
            try:
                data = await read(size)
            except OSError as exc:
                raise HttpIOError(f"reading from {self.endpoint}: {exc}") from exc
            if not data:
                reader.feed_eof()
                return
            body = reader.feed(data)
            if body:
                yield body

    async def read_body(self, max_bytes: int) -> bytes:
        """The body, or its first ``max_bytes`` if it is longer (the rest isn't read)."""
        pieces: list[bytes] = []
        held = 0
        async with contextlib.aclosing(self.iter_body()) as bodies:
            async for body in bodies:
                pieces.append(body)
                held += len(body)
                if held >= max_bytes:
                    break
        return b"".join(pieces)[:max_bytes]


@contextlib.asynccontextmanager
async def open_response(
    endpoint: Endpoint,
    target: str,
    *,
    connect_timeout_s: float,
    read_bytes: int = READ_BYTES,
) -> AsyncIterator[Response]:
    """``GET target`` on a new connection; the response once its head is in. The socket is
    closed when the block exits, however it exits (cancellation included)."""
    request = encode_get(target, endpoint.host_header)
    try:
        async with asyncio.timeout(connect_timeout_s):
            if isinstance(endpoint, UnixEndpoint):
                stream, writer = await asyncio.open_unix_connection(endpoint.path)
            else:
                stream, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    except TimeoutError as exc:
        raise HttpConnectError(
            f"connecting to {endpoint}: no answer within {format_duration(connect_timeout_s)}"
        ) from exc
    except OSError as exc:
        raise HttpConnectError(f"connecting to {endpoint}: {exc}") from exc
    try:
        try:
            writer.write(request)
            await writer.drain()
        except OSError as exc:
            raise HttpIOError(f"sending the request to {endpoint}: {exc}") from exc
        reader = ResponseReader()
        body = b""
        while reader.head is None:
            try:
                data = await stream.read(read_bytes)
            except OSError as exc:
                raise HttpIOError(f"reading from {endpoint}: {exc}") from exc
            if not data:
                reader.feed_eof()  # raises: no head yet
            body += reader.feed(data)
        yield Response(endpoint, stream, reader, reader.head, body, read_bytes)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
