"""The HTTP/1.1 response reader and its async shell, on responses recorded from a real engine.

The recordings under ``tests/data/http/`` (see its README) are whole responses as they came
off the engine's socket. Expected values come from ``http.client`` reading the same bytes
(an independent HTTP implementation), and, for the chunked logs body, from the engine's own
unchunked HTTP/1.0 answer to the same request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import io
import os
import shutil
import socket
import struct
import tempfile
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import uvloop

from forwarder import httpstream
from forwarder.docker.engine import (
    ContainerGoneError,
    Engine,
    EngineError,
    EngineUnavailableError,
    LogsUnsupportedError,
    _translate,
)
from forwarder.docker.frames import Demuxer
from forwarder.httpstream import (
    MAX_CHUNK_LINE_BYTES,
    MAX_HEAD_BYTES,
    HttpConnectError,
    HttpStreamError,
    IncompleteResponseError,
    ReaderState,
    ReaderUsageError,
    ResponseHead,
    ResponseReader,
    TcpEndpoint,
    UnixEndpoint,
    encode_get,
    open_response,
    plain_endpoint,
)
from tests.harness.engine import Engine as EngineHarness
from tests.helpers import feed_all

DATA = Path(__file__).parent / "data" / "http"
RECORDINGS = sorted(path.name for path in DATA.glob("*.http"))
SMALL = [name for name in RECORDINGS if (DATA / name).stat().st_size < 1000]

T = TypeVar("T")


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


class _Socket:
    """Just enough of a socket for ``http.client.HTTPResponse``."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *_args: Any, **_kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def reference(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) as ``http.client`` reads ``raw``."""
    response = http.client.HTTPResponse(_Socket(raw), method="GET")  # type: ignore[arg-type]
    response.begin()
    body = response.read()
    return response.status, [(k.lower(), v) for k, v in response.getheaders()], body


def read(
    raw: bytes,
    cuts: Iterable[int] = (),
    *,
    reader: ResponseReader | None = None,
    max_pending: int = 10,
) -> bytes:
    """Feed ``raw`` cut at ``cuts``, then EOF; the body. The reader must end DONE, holding
    nothing back, and never hold chunk data in a chunked body: only a size line's start
    (with the CRLF before it), shorter than ``max_pending``."""
    reader = reader if reader is not None else ResponseReader()
    out: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(raw)]:
        out.append(reader.feed(raw[prev:cut]))
        prev = cut
        if reader.state is ReaderState.CHUNKED:
            assert reader.pending_bytes < max_pending, (cut, reader)
    reader.feed_eof()
    assert reader.done
    assert reader.pending_bytes == 0
    return b"".join(out)


def feed_pieces(reader: ResponseReader, pieces: list[bytes], *, eof: bool) -> None:
    feed_all(reader.feed, *pieces)
    if eof:
        reader.feed_eof()


def raises(raw: bytes, cuts: Iterable[int] = (), *, eof: bool = False) -> HttpStreamError:
    """Feed ``raw`` cut at ``cuts`` (then EOF); the error it must raise."""
    reader = ResponseReader()
    prev = 0
    pieces: list[bytes] = []
    for cut in [*cuts, len(raw)]:
        pieces.append(raw[prev:cut])
        prev = cut
    with pytest.raises(HttpStreamError) as info:
        feed_pieces(reader, pieces, eof=eof)
    assert reader.state is ReaderState.ERROR
    with pytest.raises(ReaderUsageError):
        reader.feed(b"more")
    return info.value


def chunked(*pieces: bytes, head: bytes = b"") -> bytes:
    """A chunked 200 response: ``pieces`` are written verbatim after the head."""
    return b"HTTP/1.1 200 OK\r\n" + head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(pieces)


# ---- recorded responses ------------------------------------------------------------------


@pytest.mark.parametrize("name", RECORDINGS)
def test_recording_whole_matches_http_client(name: str) -> None:
    raw = load(name)
    status, headers, body = reference(raw)
    reader = ResponseReader()
    assert read(raw, reader=reader) == body
    assert reader.head is not None
    assert reader.head.status == status
    assert list(reader.head.headers) == headers
    assert reader.trailers == ()


def test_recorded_logs_body_equals_the_engines_unchunked_answer() -> None:
    chunked_raw = load("logs-mixed.http")
    plain_raw = load("logs-mixed-http10.http")
    body = read(chunked_raw)
    assert body == plain_raw.split(b"\r\n\r\n", 1)[1]
    # ... and it is a logs stream: seven frames, the long line's first piece 16384 bytes.
    lines = Demuxer().feed(body)
    assert [line.data[:5] for line in lines] == [
        b"err 1",
        b"out 1",
        b"out 2",
        b"a" * 5,
        b"err 2",  # logged while the long line's second piece was being read
        b"a" * 5,
        b"no ne",
    ]
    assert len(lines[3].data) == 16384
    assert lines[3].partial


@pytest.mark.parametrize("name", RECORDINGS)
def test_recording_cut_at_every_byte(name: str) -> None:
    raw = load(name)
    expected = reference(raw)[2]
    for cut in range(len(raw) + 1):
        assert read(raw, [cut]) == expected, cut


@pytest.mark.parametrize("name", SMALL)
def test_small_recording_cut_at_every_pair_of_bytes(name: str) -> None:
    raw = load(name)
    expected = reference(raw)[2]
    for first in range(len(raw) + 1):
        for second in range(first, len(raw) + 1):
            assert read(raw, [first, second]) == expected, (first, second)


@pytest.mark.parametrize("name", RECORDINGS)
def test_recording_byte_by_byte(name: str) -> None:
    raw = load(name)
    assert read(raw, range(1, len(raw))) == reference(raw)[2]


def test_close_delimited_body_ends_only_at_eof() -> None:
    raw = load("logs-mixed-http10.http")
    reader = ResponseReader()
    body = reader.feed(raw)
    assert reader.state is ReaderState.UNTIL_EOF
    assert not reader.done
    reader.feed_eof()
    assert reader.done
    assert reader.head is not None
    assert reader.head.http_version == "1.0"
    assert body == raw.split(b"\r\n\r\n", 1)[1]


def test_content_length_body_is_done_without_eof() -> None:
    raw = load("ping.http")
    reader = ResponseReader()
    assert reader.feed(raw) == b"OK"
    assert reader.done
    assert reader.head is not None
    assert reader.head.header("Content-Length") == "2"


@pytest.mark.parametrize("name", ["logs-400.http", "logs-404.http", "logs-501.http"])
def test_error_responses_are_read_whole(name: str) -> None:
    raw = load(name)
    reader = ResponseReader()
    body = reader.feed(raw)
    assert reader.done
    assert reader.head is not None
    assert not reader.head.ok
    assert reader.head.status == int(name[5:8])
    assert reader.head.header("content-type") == "application/json"
    assert body.startswith(b'{"message":"')
    assert body.endswith(b'"}\n')


def test_one_read_of_many_chunks_is_one_bytes() -> None:
    frames = [struct.pack(">BxxxL", 1, 40) + b"%039d\n" % i for i in range(1000)]
    raw = chunked(*(b"%x\r\n%s\r\n" % (len(f), f) for f in frames), b"0\r\n\r\n")
    reader = ResponseReader()
    body = reader.feed(raw)
    assert type(body) is bytes
    assert body == b"".join(frames)
    assert reader.done


# ---- chunked framing: extensions, trailers, limits -----------------------------------------


def test_chunk_extensions_are_skipped_at_every_cut() -> None:
    raw = chunked(
        b"5;name=value\r\nhello\r\n",
        b'6 ; quoted="a;b"\r\n world\r\n',
        b"A\t;x\r\n0123456789\r\n",
        b"0;last=1\r\n\r\n",
    )
    for cut in range(len(raw) + 1):
        assert read(raw, [cut], max_pending=20) == b"hello world0123456789", cut


def test_trailers_are_parsed_at_every_cut() -> None:
    raw = chunked(b"3\r\nabc\r\n", b"0\r\nX-Checksum: 1234\r\nX-Other:\tv w \r\n\r\n")
    for cut in range(len(raw) + 1):
        reader = ResponseReader()
        assert read(raw, [cut], reader=reader) == b"abc", cut
        assert reader.trailers == (("x-checksum", "1234"), ("x-other", "v w")), cut


def test_uppercase_hex_and_leading_zeros() -> None:
    raw = chunked(b"000A\r\n0123456789\r\n", b"1a\r\n" + b"z" * 26 + b"\r\n", b"00\r\n\r\n")
    assert read(raw) == b"0123456789" + b"z" * 26


def test_chunk_size_line_limit() -> None:
    def line_of(total: int) -> bytes:
        """A size line for 1 byte, ``total`` bytes long with its CRLF."""
        return b"1;" + b"e" * (total - 4) + b"\r\n"

    fits = chunked(b"1\r\nx\r\n", line_of(MAX_CHUNK_LINE_BYTES), b"y\r\n0\r\n\r\n")
    too_long = chunked(b"1\r\nx\r\n", line_of(MAX_CHUNK_LINE_BYTES + 1), b"y\r\n0\r\n\r\n")
    line_at = too_long.index(b"1;")
    for cut in (0, line_at + 10, line_at + MAX_CHUNK_LINE_BYTES - 1, len(fits) - 8):
        assert read(fits, [cut], max_pending=MAX_CHUNK_LINE_BYTES + 2) == b"xy", cut
    for cut in (
        0,
        line_at + 10,
        line_at + MAX_CHUNK_LINE_BYTES,
        line_at + MAX_CHUNK_LINE_BYTES + 1,
    ):
        error = raises(too_long, [cut])
        assert "chunk-size line" in str(error), cut
        assert error.offset == line_at, cut
    # Refused as soon as MAX_CHUNK_LINE_BYTES are held without the line's LF.
    reader = ResponseReader()
    reader.feed(too_long[: line_at + MAX_CHUNK_LINE_BYTES - 1])
    assert reader.pending_bytes == MAX_CHUNK_LINE_BYTES - 1 + 2  # with the CRLF before it
    with pytest.raises(HttpStreamError, match="longer than") as info:
        reader.feed(too_long[line_at + MAX_CHUNK_LINE_BYTES - 1 : line_at + MAX_CHUNK_LINE_BYTES])
    assert info.value.offset == line_at
    # The first chunk's line has no CRLF before it: the same limit applies.
    first = chunked(line_of(MAX_CHUNK_LINE_BYTES + 1), b"y\r\n0\r\n\r\n")
    assert raises(first).offset == first.index(b"1;")
    fits_first = chunked(line_of(MAX_CHUNK_LINE_BYTES), b"y\r\n0\r\n\r\n")
    assert read(fits_first, [60], max_pending=MAX_CHUNK_LINE_BYTES) == b"y"


@pytest.mark.parametrize(
    ("pieces", "what"),
    [
        ((b"zz\r\nhello\r\n",), "malformed chunk-size line"),
        ((b"0x5\r\nhello\r\n",), "malformed chunk-size line"),
        ((b"-5\r\nhello\r\n",), "malformed chunk-size line"),
        ((b"5 5\r\nhello\r\n",), "malformed chunk-size line"),
        ((b"5\nhello\r\n",), "malformed chunk-size line"),
        ((b"1" * 17 + b"\r\n",), "malformed chunk-size line"),  # more than 64 bits
        ((b"5\r\nhelloXX3\r\nabc\r\n",), "not followed by CRLF"),
        ((b"5\r\nhello\n3\r\nabc\r\n",), "not followed by CRLF"),
        ((b"0\r\n\x00bad\r\n\r\n",), "malformed trailer line"),
        ((b"0\r\nX-A: b\r\n continued\r\n\r\n",), "folded trailer line"),
        ((b"0\r\n\rX",), "malformed trailer line"),
    ],
)
def test_malformed_chunked_bodies(pieces: tuple[bytes, ...], what: str) -> None:
    raw = chunked(*pieces)
    body_at = raw.index(b"\r\n\r\n") + 4
    for cut in (0, body_at, body_at + 1, len(raw) - 1):
        error = raises(raw, [cut], eof=True)
        assert what in str(error), (cut, error)
        assert body_at <= error.offset <= len(raw), (cut, error.offset)


def test_error_offset_names_the_bad_byte() -> None:
    raw = chunked(b"5\r\nhello\r\n", b"3\r\nabc\r\n", b"q\r\n")
    assert raises(raw).offset == raw.index(b"q\r\n")
    assert raises(raw, range(1, len(raw))).offset == raw.index(b"q\r\n")
    no_crlf = chunked(b"5\r\nhelloXY")
    assert raises(no_crlf).offset == no_crlf.index(b"XY")


# ---- heads: status line, headers, framing ------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"garbage",
        b"\x16\x03\x01\x02\x00\x01",  # a TLS record: the engine speaks TLS on this port
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bad\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX Bad: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",  # bare LF line ends
    ],
)
def test_garbage_heads_are_refused(raw: bytes) -> None:
    error = raises(raw, eof=True)
    assert error.offset <= len(raw)
    # Any split gives the same verdict, at the same offset (what it quotes may be shorter).
    verdict = str(error).partition(":")[0]
    for cut in range(len(raw) + 1):
        split_error = raises(raw, [cut], eof=True)
        assert str(split_error).partition(":")[0] == verdict, cut
        assert split_error.offset == error.offset, cut


def test_garbage_status_line_is_refused_before_the_head_ends() -> None:
    reader = ResponseReader()
    with pytest.raises(HttpStreamError, match=r"not an HTTP/1\.x status line") as info:
        reader.feed(b"HTTP/1.1 OK then some headers\r\nServer: x\r\n")
    assert info.value.offset == 0
    with pytest.raises(HttpStreamError, match=r"at byte 0\b"):
        ResponseReader().feed(b"{")


def test_header_names_are_lowercased_and_values_trimmed() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nX-Multi: a\r\nContent-Length:  0 \r\nx-multi: b\r\n\r\n")
    head = reader.head
    assert head is not None
    assert head.headers == (("x-multi", "a"), ("content-length", "0"), ("x-multi", "b"))
    assert head.header("X-MULTI") == "a, b"
    assert head.header("absent") is None
    assert reader.done


def test_head_limit() -> None:
    limit = 256

    def head_of(total: int) -> bytes:
        start = b"HTTP/1.1 200 OK\r\nX-Pad: "
        return start + b"p" * (total - len(start) - 4) + b"\r\n\r\n"

    fits = head_of(limit) + b"body"
    assert len(head_of(limit)) == limit
    for cut in range(len(fits) + 1):
        assert read(fits, [cut], reader=ResponseReader(max_head_bytes=limit)) == b"body", cut
    too_big = head_of(limit + 1) + b"body"
    for cut in range(len(too_big) + 1):
        reader = ResponseReader(max_head_bytes=limit)
        with pytest.raises(HttpStreamError, match=f"within {limit}|more than {limit}"):
            feed_all(reader.feed, too_big[:cut], too_big[cut:])
    # An unending head is refused as soon as it holds ``limit`` bytes without its end (its
    # blank line would make it longer), not at EOF.
    unending = head_of(limit + 100)[:limit]
    reader = ResponseReader(max_head_bytes=limit)
    assert reader.feed(unending[:-1]) == b""
    assert reader.pending_bytes == limit - 1
    with pytest.raises(HttpStreamError, match=f"within {limit} bytes") as info:
        reader.feed(unending[-1:])
    assert info.value.offset == 0


def test_default_head_limit_refuses_oversized_headers() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    with pytest.raises(HttpStreamError, match=f"within {MAX_HEAD_BYTES} bytes"):
        feed_all(reader.feed, *[line] * (MAX_HEAD_BYTES // len(line) + 1))


def test_trailer_section_limit() -> None:
    limit = 128
    trailer = b"X-T: " + b"t" * 200 + b"\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n" + trailer
    for cut in (0, len(raw) - len(trailer) + 50, len(raw) - 1):
        reader = ResponseReader(max_head_bytes=limit)
        with pytest.raises(HttpStreamError, match="trailer section"):
            feed_all(reader.feed, raw[:cut], raw[cut:])
    assert read(raw, reader=ResponseReader(max_head_bytes=len(trailer))) == b"x"
    # Refused as soon as ``limit`` bytes are held without the section's end.
    reader = ResponseReader(max_head_bytes=limit)
    start = len(raw) - len(trailer)
    reader.feed(raw[: start + limit - 1])
    assert reader.state is ReaderState.TRAILERS
    assert reader.pending_bytes == limit - 1
    with pytest.raises(HttpStreamError, match=f"trailer section within {limit}") as info:
        reader.feed(raw[start + limit - 1 : start + limit])
    assert info.value.offset == start


def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + load(
        "ping.http"
    )
    for cut in range(len(raw) + 1):
        reader = ResponseReader()
        assert read(raw, [cut], reader=reader) == b"OK", cut
        assert reader.head is not None
        assert reader.head.status == 200


def test_no_body_statuses_and_zero_length() -> None:
    for raw in (
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ):
        reader = ResponseReader()
        assert reader.feed(raw) == b""
        assert reader.done, raw


def test_framing_choices() -> None:
    # Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert read(both + b"5\r\nhello\r\n0\r\n\r\n") == b"hello"
    # Repeated equal Content-Length values are one.
    assert read(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok") == b"ok"
    for head, what in (
        (b"Transfer-Encoding: gzip, chunked", "unsupported Transfer-Encoding"),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", "unsupported Transfer"),
        (b"Content-Length: 2\r\nContent-Length: 3", "invalid Content-Length"),
        (b"Content-Length: -1", "invalid Content-Length"),
        (b"Content-Length: 0x10", "invalid Content-Length"),
    ):
        raw = b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n"
        assert what in str(raises(raw)), head
    assert "101 Switching" in str(raises(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"))


# ---- the end of the response ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"", "closed before a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed in the response head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", "2 bytes short"),
        (chunked(b"5\r\nhel"), "in the middle of the chunked body"),
        (chunked(b"5\r\nhello"), "in the middle of the chunked body"),
        (chunked(b"5\r\nhello\r\n"), "in the middle of the chunked body"),
        (chunked(b"5\r\nhello\r\n0\r\n"), "trailer section"),
        (chunked(b"5\r\nhello\r\n0\r\nX-A: b\r\n"), "trailer section"),
    ],
)
def test_eof_before_the_end(raw: bytes, what: str) -> None:
    reader = ResponseReader()
    reader.feed(raw)
    with pytest.raises(IncompleteResponseError, match=what) as info:
        reader.feed_eof()
    assert info.value.offset == len(raw)
    with pytest.raises(ReaderUsageError):
        reader.feed_eof()


@pytest.mark.parametrize("name", ["logs-mixed.http", "ping.http", "logs-404.http"])
def test_bytes_after_the_end_are_refused(name: str) -> None:
    raw = load(name)
    for extra in (b"X", b"HTTP/1.1 200 OK\r\n\r\n"):
        error = raises(raw + extra)
        assert "after the end of the response" in str(error)
        assert error.offset == len(raw)
        reader = ResponseReader()
        reader.feed(raw)
        assert reader.done
        assert reader.feed(b"") == b""
        with pytest.raises(HttpStreamError, match="after the end") as info:
            reader.feed(extra)
        assert info.value.offset == len(raw)


def test_response_head_checks_itself() -> None:
    with pytest.raises(ValueError, match="three digits"):
        ResponseHead(status=42, reason="", headers=())
    with pytest.raises(ValueError, match="lower-case"):
        ResponseHead(status=200, reason="OK", headers=(("Server", "x"),))
    with pytest.raises(ValueError, match=r"HTTP/1\.x"):
        ResponseHead(status=200, reason="OK", headers=(), http_version="2")


def test_repr_shows_the_state() -> None:
    reader = ResponseReader()
    reader.feed(chunked(b"5\r\nhe"))
    assert repr(reader).startswith("<ResponseReader CHUNKED status=200 received=")


# ---- request and endpoints -----------------------------------------------------------------


def test_encode_get() -> None:
    assert encode_get("/v1.41/containers/abc/logs?follow=1", "localhost") == (
        b"GET /v1.41/containers/abc/logs?follow=1 HTTP/1.1\r\nHost: localhost\r\n"
        b"User-Agent: forwarder\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    for bad in ("containers/x", "/a b", "/a\r\nX: y"):
        with pytest.raises(ValueError, match="origin-form"):
            encode_get(bad, "localhost")


def test_plain_endpoint() -> None:
    sock = UnixEndpoint("/run/docker.sock")
    assert plain_endpoint("unix:///run/docker.sock", tls_verify=False) == sock
    assert plain_endpoint("unix:///run/docker.sock", tls_verify=True) == sock
    assert sock.host_header == "localhost"
    assert plain_endpoint("tcp://10.0.0.5:2375", tls_verify=False) == TcpEndpoint("10.0.0.5", 2375)
    assert plain_endpoint("tcp://[::1]:2375", tls_verify=False) == TcpEndpoint("::1", 2375)
    assert TcpEndpoint("::1", 2375).host_header == "[::1]:2375"
    assert plain_endpoint("tcp://10.0.0.5:2376", tls_verify=True) is None
    assert plain_endpoint("https://10.0.0.5:2376", tls_verify=False) is None
    assert plain_endpoint("ssh://me@host", tls_verify=False) is None


# ---- the async shell, against a fake engine on a unix socket ------------------------------


Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner[Any]]:
    """Run a coroutine on the stock loop or on uvloop (what ``forwarder run`` uses).

    A socket left for the garbage collector to close fails the test: asyncio's StreamWriter
    closes its transport when it is collected, so an fd count alone can't see the leak.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield uvloop.run if request.param == "uvloop" else asyncio.run
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A unix socket path is limited to ~107 bytes: pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="fwd-http-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class FakeEngine:
    """A unix-socket server that reads one request head and answers with canned bytes,
    written in ``pieces`` (then closes, unless ``hold``: then it waits for the client to
    close). ``requests``: the request heads received; ``closed``: set when a client's EOF
    arrives."""

    def __init__(
        self, path: Path, response: bytes, *, cuts: Iterable[int] = (), hold: bool = False
    ) -> None:
        self.path = path
        self.response = response
        self.cuts = list(cuts)
        self.hold = hold
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.sent = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            prev = 0
            for cut in [*self.cuts, len(self.response)]:
                writer.write(self.response[prev:cut])
                await writer.drain()
                prev = cut
            self.sent.set()
            if self.hold:
                await reader.read()  # the client's EOF
                self.closed.set()
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[FakeEngine]:
        server = await asyncio.start_unix_server(self._handle, str(self.path))
        async with server:
            yield self


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def collect(engine: Engine, cid: str = "c1d", **kwargs: Any) -> bytes:
    pieces = [data async for data in engine.log_bytes(cid, follow=False, **kwargs)]
    return b"".join(pieces)


def test_log_bytes_reads_through_the_socket(run: Runner[Any], socket_dir: Path) -> None:
    raw = load("logs-mixed.http")
    expected = reference(raw)[2]

    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", raw, cuts=range(7, len(raw), 997))
        engine = Engine(f"unix://{fake.path}")
        async with fake.serving():
            assert await collect(engine, since="1795591227.332405349") == expected
            # aiodocker hasn't negotiated a version yet: the unversioned path.
            assert fake.requests[0].startswith(
                b"GET /containers/c1d/logs?follow=0&stdout=1&stderr=1&timestamps=1"
                b"&since=1795591227.332405349 HTTP/1.1\r\nHost: localhost\r\n"
            )
            engine.docker.api_version = "v1.41"  # as after its first request
            assert await collect(engine) == expected
            assert fake.requests[1].startswith(b"GET /v1.41/containers/c1d/logs?follow=0&")
        assert engine.open_connections() == 0
        await engine.aclose()

    run(main())


@pytest.mark.parametrize(
    ("response", "error", "message"),
    [
        (load("logs-404.http"), ContainerGoneError, "No such container: 0000"),
        (load("logs-501.http"), LogsUnsupportedError, "does not support reading"),
        (
            b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 73\r\n"
            b'\r\n{"message":"can not get logs from container which is marked for removal"}',
            ContainerGoneError,
            "marked for removal",
        ),
        (
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\nboom\n",
            EngineUnavailableError,
            "boom",
        ),
    ],
)
def test_error_statuses_translate_as_before(
    run: Runner[Any], socket_dir: Path, response: bytes, error: type[Exception], message: str
) -> None:
    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", response, cuts=[len(response) - 3])
        engine = Engine(f"unix://{fake.path}")
        async with fake.serving():
            with pytest.raises(error, match=message) as info:
                await collect(engine)
        assert type(info.value) is error
        assert engine.open_connections() == 0
        await engine.aclose()

    run(main())


@pytest.mark.parametrize(
    "exc", [TimeoutError(), aiohttp.ClientConnectionError(), ConnectionResetError()]
)
def test_an_error_without_a_message_is_named_by_its_class(exc: Exception) -> None:
    # An exception object is always truthy: "GET /events: " said nothing about what broke.
    assert str(_translate(exc, "GET /events")) == f"GET /events: {type(exc).__name__}"


def test_bad_request_is_a_plain_engine_error(run: Runner[Any], socket_dir: Path) -> None:
    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", load("logs-400.http"))
        engine = Engine(f"unix://{fake.path}")
        async with fake.serving():
            with pytest.raises(EngineError, match="HTTP 400: Bad parameters") as info:
                await collect(engine)
        assert type(info.value) is EngineError
        await engine.aclose()

    run(main())


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (load("logs-mixed.http")[:5000], "in the middle of the chunked body"),
        (b"", "closed before a response"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x status line"),
        (load("logs-mixed.http") + b"junk", "after the end of the response"),
    ],
)
def test_broken_responses_are_transient(
    run: Runner[Any], socket_dir: Path, response: bytes, message: str
) -> None:
    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", response)
        engine = Engine(f"unix://{fake.path}")
        async with fake.serving():
            with pytest.raises(EngineUnavailableError, match=message) as info:
                await collect(engine)
        assert isinstance(info.value.__cause__, HttpStreamError)
        await engine.aclose()

    run(main())


def test_no_engine_is_transient(run: Runner[Any], socket_dir: Path) -> None:
    async def main() -> None:
        engine = Engine(f"unix://{socket_dir / 'missing.sock'}")
        with pytest.raises(EngineUnavailableError, match="connecting to unix://") as info:
            await collect(engine)
        assert isinstance(info.value.__cause__, HttpConnectError)
        assert engine.open_connections() == 0
        await engine.aclose()

    run(main())


def test_cancelled_stream_closes_its_socket(run: Runner[Any], socket_dir: Path) -> None:
    """A follow stream cancelled mid-body: the engine sees the close, no fd is left."""
    raw = load("logs-follow.http")
    partial = raw[: raw.index(b"\r\n2e\r\n")]  # the head and the first frame's chunk

    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", partial, hold=True)
        engine = Engine(f"unix://{fake.path}")
        async with fake.serving():
            before = fd_count()
            got = asyncio.Event()
            received: list[bytes] = []

            async def follow() -> None:
                async for data in engine.log_bytes("c1d", follow=True):
                    received.append(data)
                    got.set()

            task = asyncio.create_task(follow())
            await got.wait()
            assert engine.open_connections() == 1  # counted while open
            assert fd_count() == before + 2  # our socket and the fake engine's
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(fake.closed.wait(), timeout=10)
            assert engine.open_connections() == 0
            assert b"first\n" in b"".join(received)
        await engine.aclose()
        assert fd_count() <= before

    run(main())


def test_open_response_exposes_head_and_body(run: Runner[Any], socket_dir: Path) -> None:
    raw = load("logs-tty.http")

    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", raw, cuts=[1, 30, 200])
        async with (
            fake.serving(),
            open_response(
                UnixEndpoint(str(fake.path)), "/containers/x/logs", connect_timeout_s=5
            ) as response,
        ):
            assert response.status == 200
            assert response.head.ok
            assert response.head.header("api-version") == "1.41"
            assert repr(response).startswith(f"<Response unix://{fake.path} 200 ")
            assert await response.read_body(1 << 20) == reference(raw)[2]

    run(main())


def test_read_body_stops_at_its_cap(run: Runner[Any], socket_dir: Path) -> None:
    raw = load("logs-mixed.http")

    async def main() -> None:
        fake = FakeEngine(socket_dir / "e.sock", raw)
        async with (
            fake.serving(),
            open_response(UnixEndpoint(str(fake.path)), "/x", connect_timeout_s=5) as response,
        ):
            assert await response.read_body(100) == reference(raw)[2][:100]

    run(main())


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listener never accepts, with its accept queue full: Linux
    drops further SYNs, so a connect to it neither succeeds nor fails."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(16):
            filler = stack.enter_context(socket.socket())
            filler.settimeout(0.5)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("the accept queue never filled up")
        yield port


def test_connect_timeout(run: Runner[Any], unanswered_port: int) -> None:
    async def main() -> None:
        endpoint = TcpEndpoint("127.0.0.1", unanswered_port)
        with pytest.raises(HttpConnectError, match=r"no answer within 300ms"):
            async with open_response(endpoint, "/x", connect_timeout_s=0.3):
                pass

    run(main())


def test_module_exports() -> None:
    assert set(httpstream.__all__) <= set(dir(httpstream))


# ---- against a real engine -----------------------------------------------------------------


def test_log_bytes_matches_the_aiohttp_path_on_a_real_engine(engine: EngineHarness) -> None:
    script = (
        "echo first; echo err-1 >&2; head -c 40000 /dev/zero | tr '\\0' L; echo; "
        "echo err-2 >&2; printf 'tail without newline'"
    )
    cid = engine.run("sh", "-c", script)
    assert engine.wait_exited(cid) == 0
    oracle = engine.logs_api_bytes(cid, timestamps=True)

    async def main() -> tuple[bytes, bytes, bytes]:
        ours = Engine(engine.host)
        try:
            direct = b"".join([d async for d in ours.log_bytes(cid, follow=True)])
            params = {"follow": 0, "stdout": 1, "stderr": 1, "timestamps": 1}
            via_aiohttp = b"".join([d async for d in ours._log_bytes_aiohttp(cid, params)])
            await ours.inspect(cid)  # aiodocker negotiates a version: the versioned path
            assert ours.docker.api_version.startswith("v1.")
            pooled = ours.open_connections()  # aiohttp's idle keep-alive connection
            versioned = b"".join([d async for d in ours.log_bytes(cid, follow=False)])
            with pytest.raises(ContainerGoneError, match="No such container"):
                await collect(ours, "f" * 64)
            assert ours.open_connections() == pooled  # the log streams' sockets are closed
            return direct, via_aiohttp, versioned
        finally:
            await ours.aclose()

    direct, via_aiohttp, versioned = uvloop.run(main())
    assert direct == via_aiohttp == versioned == oracle
    lines = Demuxer().feed(direct)
    assert b"".join(line.data for line in lines if line.data[:1] == b"L") == b"L" * 40000
    assert {line.source for line in lines} == {"stdout", "stderr"}
    assert lines[-1].data == b"tail without newline"


def test_missing_container_is_gone_on_a_real_engine(engine: EngineHarness) -> None:
    async def main() -> None:
        ours = Engine(engine.host)
        try:
            for follow in (False, True):
                with pytest.raises(ContainerGoneError, match="No such container"):
                    async for _ in ours.log_bytes("0" * 64, follow=follow):
                        pass
        finally:
            await ours.aclose()

    uvloop.run(main())
